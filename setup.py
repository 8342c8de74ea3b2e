"""Installs the `detector` and `proposals` packages (pip install -e .)."""
from setuptools import setup

setup(
    name="sppnet",
    version="0.1.0",
    description="SPP-net object detection (He et al. 2014) in PyTorch: SPP layer, selective search "
    "proposals, SVM + box-regression detector, exact VOC evaluation.",
    packages=["detector", "detector.bench", "detector.data", "detector.engine", "detector.eval", "proposals"],
    python_requires=">=3.10",
    install_requires=[
        # torch/torchvision: the pair pinned by the Makefile installs from local disk here; any
        # 2.x release with torchvision ops works.
        "torch>=2.1,<3",
        "torchvision>=0.16,<1",
        # contrib build for cv2.ximgproc (selective search, EdgeBoxes); never together with
        # opencv-python, which shadows the contrib modules (opencv_contrib#3147).
        "opencv-contrib-python-headless>=4.8,<6",
        "scikit-learn>=1.3,<2",
        "scikit-image>=0.21,<1",
        "scipy>=1.10,<2",
        "pycocotools>=2.0.7,<3",
        "PyYAML>=6,<7",
        "tqdm>=4.60,<5",
        "matplotlib>=3.7,<4",
        "Pillow>=9,<14",
        "numpy>=1.24,<3",
    ],
    extras_require={"test": ["pytest>=7,<10", "hypothesis>=6,<7"]},
)
