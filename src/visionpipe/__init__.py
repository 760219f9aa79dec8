"""visionpipe: a reproducible Keras 3 computer-vision pipeline driven by DVC."""

__version__ = "0.1.0"
