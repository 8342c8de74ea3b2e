"""`sppnet compare-rcnn` as a script: the command lives in detector/commands/compare_rcnn.py (see --help)."""
import sys

from detector.commands.compare_rcnn import main

if __name__ == "__main__":
    sys.exit(main())
