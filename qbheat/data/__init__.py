"""Data sources. Nothing here downloads: every set installs from a package registry.

- ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` (70k real 28×28 images, 10 classes, MIT).
- ``samples``: natural photographs bundled with scikit-image, for calibration and golden images.
- ``detection_canvas``: Fashion-MNIST items placed on canvases, written as a COCO detection set.
"""
