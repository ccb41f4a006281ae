"""numpy reference implementations: the yardstick every kernel is checked against.

Written for clarity, not speed; no MXNet import. Layout is NCW, like Gluon's Conv1D.
"""
from .add_relu import add_relu_backward, add_relu_forward
from .conv1d_bn_relu import (conv1d, conv1d_backward, conv1d_bn_relu_backward,
                             conv1d_bn_relu_forward, conv1d_out_width, relu_grad, relu_value)

__all__ = ["add_relu_forward", "add_relu_backward", "conv1d", "conv1d_backward",
           "conv1d_out_width", "conv1d_bn_relu_forward", "conv1d_bn_relu_backward", "relu_value",
           "relu_grad"]
