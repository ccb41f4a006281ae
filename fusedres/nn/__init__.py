"""Gluon blocks built on the fused ops."""
from .basic import AddReLU, ConvBNReLU1D

__all__ = ["ConvBNReLU1D", "AddReLU"]
