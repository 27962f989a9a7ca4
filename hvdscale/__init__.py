"""hvdscale: Horovod-based data-parallel training at scale for PyTorch and TensorFlow."""

__version__ = "0.1.0"
