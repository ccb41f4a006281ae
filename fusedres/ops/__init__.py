"""The fused ops and their functional forms, for NDArrays and Symbols.

Each op exists as an MXNet operator (``_fusedres_conv1d_bn_relu``, ``_fusedres_add_relu``:
:mod:`.native`, the CPU path) and as a Python CustomOp (``op_type='fusedres_conv1d_bn_relu'``,
``'fusedres_add_relu'``: :mod:`.custom`, the GPU path); :mod:`.dispatch` holds the rule that
picks one. Importing this package registers both.
"""
import atexit

import mxnet as mx

from . import custom, dispatch, native  # noqa: F401  (custom: registers the CustomOps)
from ..attrs import ConvAttrs
from .errors import translate_errors

# A CustomOp still queued when Python exits runs its callback during interpreter teardown,
# which hangs or crashes MXNet's shutdown. Registered after MXNet's own exit hook, this runs
# first and lets queued work finish while Python is still whole.
atexit.register(mx.nd.waitall)

# Register the MXNet operators now, so that `import fusedres` is all a process needs before
# SymbolBlock.imports of an exported model.
native.available()

CONV1D_BN_RELU = native.CONV1D_BN_RELU
ADD_RELU = native.ADD_RELU


def _namespace(arrays, names):
    """mx.nd or mx.sym, from arrays that must all be NDArrays or all Symbols."""
    kinds = [(n, a) for n, a in zip(names, arrays) if a is not None]
    first_name, first = kinds[0]
    if isinstance(first, mx.sym.Symbol):
        F, kind = mx.sym, mx.sym.Symbol
    elif isinstance(first, mx.nd.NDArray):
        F, kind = mx.nd, mx.nd.NDArray
    else:
        raise TypeError(f"{first_name} must be an NDArray or a Symbol, got "
                        f"{type(first).__name__}")
    for name, a in kinds[1:]:
        if not isinstance(a, kind):
            raise TypeError(f"{name} must be a{'n' if kind is mx.nd.NDArray else ''} "
                            f"{kind.__name__} like {first_name}, got {type(a).__name__}")
    return F


def _check_size(F, name, x):
    # A zero-size dimension reaches the operators as an unknown one, which names nothing.
    if F is mx.nd and 0 in x.shape:
        raise ValueError(f"{name} must have no zero-size dimension, got shape {x.shape}")


def run_conv1d_bn_relu(F, attrs, data, weight, bias, gamma, beta, running_mean, running_var,
                       name=None, use_native=None, ctx=None):
    """conv1d_bn_relu with validated attributes (a ConvAttrs), for the blocks. ctx: the data's
    context when F is mx.sym (None: unknown)."""
    if F is mx.nd:
        _check_size(F, "data", data)
        ctx = data.context
    impl = dispatch.choose(use_native, ctx)
    with translate_errors():
        return impl.conv1d_bn_relu(F, attrs, data, weight, bias, gamma, beta, running_mean,
                                   running_var, name=name)


def run_add_relu(F, lhs, rhs, name=None, use_native=None, ctx=None):
    """add_relu for the blocks (see run_conv1d_bn_relu)."""
    if F is mx.nd:
        _check_size(F, "lhs", lhs)
        _check_size(F, "rhs", rhs)
        ctx = lhs.context
    impl = dispatch.choose(use_native, ctx)
    with translate_errors():
        return impl.add_relu(F, lhs, rhs, name=name)


def conv1d_bn_relu(data, weight, bias, gamma, beta, running_mean, running_var, *, kernel,
                   num_filter, stride=1, pad=0, dilate=1, num_group=1, eps=1e-5, momentum=0.9,
                   use_global_stats=False, relu=True, name=None, use_native=None):
    """relu(BatchNorm(Convolution(data))) fused, for NDArrays or Symbols.

    Mirrors ``Convolution(kernel=(k,), ...)`` followed by ``BatchNorm(fix_gamma=False, ...)``
    and ``relu`` (``relu=False``: no relu). ``bias=None`` means no conv bias. With autograd in
    training mode (or an executor's ``forward(is_train=True)``) the batch statistics normalize
    and the running statistics are updated in place; otherwise the running statistics are used.
    ``use_native``: see :func:`fusedres.ops.dispatch.choose`.
    """
    names = ("data", "weight", "bias", "gamma", "beta", "running_mean", "running_var")
    F = _namespace((data, weight, bias, gamma, beta, running_mean, running_var), names)
    attrs = ConvAttrs.parse(kernel=kernel, num_filter=num_filter, stride=stride, pad=pad,
                            dilate=dilate, num_group=num_group, no_bias=bias is None, eps=eps,
                            momentum=momentum, use_global_stats=use_global_stats, relu=relu)
    return run_conv1d_bn_relu(F, attrs, data, weight, bias, gamma, beta, running_mean,
                              running_var, name=name, use_native=use_native)


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
        name=name, **kwargs)


def add_relu(lhs, rhs, name=None, use_native=None):
    """relu(lhs + rhs) fused, for NDArrays or Symbols of the same shape."""
    F = _namespace((lhs, rhs), ("lhs", "rhs"))
    return run_add_relu(F, lhs, rhs, name=name, use_native=use_native)


__all__ = ["conv1d_bn_relu", "conv1d_bn_relu_symbol", "add_relu", "ConvAttrs", "CONV1D_BN_RELU",
           "ADD_RELU", "translate_errors"]
