"""aimv2: a kernel-optimized training core for AIMv2 vision encoders."""
__version__ = "0.1.0"
