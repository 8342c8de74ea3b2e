"""Object proposals for SPP-net: selective search (OpenCV contrib), EdgeBoxes, proposal files."""
