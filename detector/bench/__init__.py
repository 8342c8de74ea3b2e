"""Library code of the timing benchmarks (tools/benchmark.py, tools/compare_rcnn.py, and
tools/test_net.py --compare-rcnn), kept out of the detector's own modules.

Modules:
    random_model   random-weight ZF-5 detectors and random boxes (timing does not depend on weights)
    inputs         VOC-sized real photos and ~2000 proposals per image
    rcnn_compare   SPP-net vs R-CNN mode timing on one model, and its paper-shaped table
    spp            the ``spp`` section: spp_pool vs the roi_pool composition
    sections       the other benchmark sections (R-CNN, detection, selective search, memory,
                   GPU), each returning Markdown and machine-readable figures
    runner         runs sections in order and rewrites their blocks of BENCHMARKS.md

Import the module you need; this package imports none of them itself.
"""
