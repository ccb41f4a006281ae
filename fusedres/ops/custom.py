"""The ops as Python CustomOps (``mx.sym.Custom(op_type='fusedres_conv1d_bn_relu')`` and
``'fusedres_add_relu'``): the GPU path (CUDA kernels through CuPy) and the portable one.

On the CPU, MXNet runs a CustomOp's callback after the engine call that started it has
returned. An MKLDNN neighbour's array in a non-default layout reaches it through a temporary
default-layout copy that MXNet frees when that call returns (CreateDefaultInputs in
src/imperative/imperative_utils.h), so the callback reads freed memory: garbage inputs in
forward, garbage head gradients in backward (a GlobalAvgPool1D head; MXNet's pooling backward
writes its gradient in an nwc layout). The forms below therefore pass every CPU array through a
guard in both directions: before each input, and after the output (so that the head gradient
arrives from the guard's backward). The guard must hand over a fresh array in the default
layout, forward and backward: the MXNet operator ``_fusedres_layout_copy`` (an FCompute op,
whose inputs MXNet converts synchronously, that never runs in place; shapes infer both ways).
Without the operator library, a full ``slice_axis`` does the same for data (a plain operator
that cannot run in place; its shapes infer forward only) and ``identity`` for the weight (a
graph input is never overwritten in place). ``identity`` is not enough for data: in a hybridized
graph it may run in place and pass the MKLDNN array through.
"""
import mxnet as mx

from . import add_relu as _add_relu_op
from . import conv1d_bn_relu as _conv_op
from . import native

# The CustomOps' op_type (the MXNet operators' names are fusedres.ops.native's).
CONV1D_BN_RELU_OP_TYPE = _conv_op.OP_NAME
ADD_RELU_OP_TYPE = _add_relu_op.OP_NAME


def needs_guard(F, x):
    """On the CPU (or an unknown device: Symbols) the arrays go through guards."""
    return F is mx.sym or x.context.device_type != "gpu"


def _guard(F, x, name, parameter=False):
    kw = {} if name is None else {"name": name}
    if native.available()[0]:
        return getattr(F._internal, native.LAYOUT_COPY)(x, **kw)
    if parameter:
        # Lets shape inference fill in a deferred Parameter's shape, which slice_axis does not.
        return F.identity(x, **kw)
    return F.slice_axis(x, axis=0, begin=0, end=None, **kw)


def _with_name(name, suffix):
    return None if name is None else f"{name}_{suffix}"


def conv1d_bn_relu(F, attrs, data, weight, bias, gamma, beta, running_mean, running_var,
                   name=None):
    """relu(BatchNorm(Convolution(data))) by the CustomOp; attrs: a ConvAttrs."""
    guard = needs_guard(F, data)
    if guard:
        # The weight too: a stock MKLDNN Conv1D whose Parameter fuse() handed over may have
        # reordered it in place during inference.
        data = _guard(F, data, _with_name(name, "data"))
        weight = _guard(F, weight, _with_name(name, "weight_plain"), parameter=True)
    args = [data, weight] + ([] if bias is None else [bias]) + [gamma, beta, running_mean,
                                                               running_var]
    kw = dict(attrs.op_kwargs, op_type=CONV1D_BN_RELU_OP_TYPE)
    if name is not None:
        kw["name"] = name
    y = F.Custom(*args, **kw)
    return _guard(F, y, _with_name(name, "out")) if guard else y


def add_relu(F, lhs, rhs, name=None):
    """relu(lhs + rhs) by the CustomOp."""
    guard = needs_guard(F, lhs)
    if guard:
        lhs, rhs = _guard(F, lhs, _with_name(name, "lhs")), _guard(F, rhs, _with_name(name, "rhs"))
    kw = dict(op_type=ADD_RELU_OP_TYPE)
    if name is not None:
        kw["name"] = name
    y = F.Custom(lhs, rhs, **kw)
    return _guard(F, y, _with_name(name, "out")) if guard else y


__all__ = ["conv1d_bn_relu", "add_relu", "CONV1D_BN_RELU_OP_TYPE", "ADD_RELU_OP_TYPE"]
