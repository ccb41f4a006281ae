"""The fused ops as MXNet CustomOps, and their functional forms for NDArrays and Symbols.

Importing this package registers ``fusedres_conv1d_bn_relu`` and ``fusedres_add_relu``.
"""
import atexit

import mxnet as mx

from . import add_relu as _add_relu_op
from . import conv1d_bn_relu as _conv_op
from . import native
from ._common import conv_attrs, translate_errors

# A CustomOp still queued when Python exits runs its callback during interpreter teardown,
# which hangs or crashes MXNet's shutdown. Registered after MXNet's own exit hook, this runs
# first and lets queued work finish while Python is still whole.
atexit.register(mx.nd.waitall)

# Register the native ops too when their library was built, so that `import fusedres` is all a
# process needs before SymbolBlock.imports of a model exported with either implementation.
native.available()

CONV1D_BN_RELU = _conv_op.OP_NAME
ADD_RELU = _add_relu_op.OP_NAME


def _namespace(x):
    return mx.sym if isinstance(x, mx.sym.Symbol) else mx.nd


def _plain(F, x, plain_layout, name=None):
    """x as the CustomOp may read it. MXNet hands a CustomOp the raw memory of its inputs, and
    an MKLDNN operator's output can be in a blocked layout that then reads as garbage; the
    identity operator converts it (one copy). Needed on the CPU only: None decides by the
    NDArray's device, and for Symbols (device unknown) inserts it."""
    if plain_layout is None:
        plain_layout = F is mx.sym or x.context.device_type != "gpu"
    if not plain_layout:
        return x
    return F.identity(x, name=name) if name is not None else F.identity(x)


def _invoke(F, *args, **kwargs):
    if F is mx.sym:
        return F.Custom(*args, **kwargs)
    with translate_errors():
        return F.Custom(*args, **kwargs)


def conv1d_bn_relu(data, weight, bias, gamma, beta, running_mean, running_var, *, kernel,
                   num_filter, stride=1, pad=0, dilate=1, num_group=1, eps=1e-5, momentum=0.9,
                   use_global_stats=False, relu=True, name=None, F=None, plain_layout=None):
    """relu(BatchNorm(Convolution(data))) fused, for NDArrays or Symbols.

    Mirrors ``Convolution(kernel=(k,), ...)`` followed by ``BatchNorm(fix_gamma=False, ...)``
    and ``relu`` (``relu=False``: no relu). ``bias=None`` means no conv bias. With autograd in
    training mode (or a Symbol executor with ``is_train=True``) the batch statistics normalize
    and the running statistics are updated in place; otherwise the running statistics are used.
    ``plain_layout``: see ``_plain`` (None is right unless you know the data's device).
    """
    F = F or _namespace(data)
    # The weight too: a stock MKLDNN Conv1D whose Parameter fuse() handed over may have
    # reordered it in place during inference.
    args = [_plain(F, data, plain_layout, name and f"{name}_data"),
            _plain(F, weight, plain_layout, name and f"{name}_weight_plain")] + ([] if bias is None else [bias]) + [gamma, beta, running_mean,
                                                               running_var]
    kw = dict(op_type=CONV1D_BN_RELU, **conv_attrs(
        kernel, num_filter, stride=stride, pad=pad, dilate=dilate, num_group=num_group,
        no_bias=bias is None, eps=eps, momentum=momentum, use_global_stats=use_global_stats,
        relu=relu))
    if name is not None:
        kw["name"] = name
    return _invoke(F, *args, **kw)


def conv1d_bn_relu_symbol(data, *, num_filter, kernel, name, no_bias=False, **kwargs):
    """Symbol API form: ``conv1d_bn_relu`` with its parameters declared as Variables
    ``{name}_weight``, ``{name}_bias`` (unless no_bias), ``{name}_gamma``, ``{name}_beta`` and
    the auxiliary states ``{name}_running_mean`` (zeros) and ``{name}_running_var`` (ones),
    so that ``mx.mod.Module.init_params`` sets them all up. Other keyword arguments as in
    ``conv1d_bn_relu``."""
    v = mx.sym.Variable
    return conv1d_bn_relu(
        data, v(f"{name}_weight"), None if no_bias else v(f"{name}_bias"), v(f"{name}_gamma"),
        v(f"{name}_beta"), v(f"{name}_running_mean", init=mx.init.Zero()),
        v(f"{name}_running_var", init=mx.init.One()), kernel=kernel, num_filter=num_filter,
        name=name, F=mx.sym, **kwargs)


def add_relu(lhs, rhs, name=None, F=None, plain_layout=None):
    """relu(lhs + rhs) fused, for NDArrays or Symbols of the same shape."""
    F = F or _namespace(lhs)
    kw = dict(op_type=ADD_RELU)
    if name is not None:
        kw["name"] = name
    return _invoke(F, _plain(F, lhs, plain_layout, name and f"{name}_lhs"),
                   _plain(F, rhs, plain_layout, name and f"{name}_rhs"), **kw)


__all__ = ["conv1d_bn_relu", "conv1d_bn_relu_symbol", "add_relu", "CONV1D_BN_RELU", "ADD_RELU", "translate_errors"]
