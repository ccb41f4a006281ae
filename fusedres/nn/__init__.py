"""Gluon blocks built on the fused ops."""
from .basic import AddReLU, ConvBN1D, ConvBNReLU1D
from .pooling import AvgPool1D, MaxPool1D
from .residual import BasicBlock1D, ResidualBlock1D, SkipConnection

__all__ = ["ConvBNReLU1D", "ConvBN1D", "AddReLU", "ResidualBlock1D", "BasicBlock1D",
           "SkipConnection", "MaxPool1D", "AvgPool1D"]
