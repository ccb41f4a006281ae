"""The fused ops as native MXNet operators: a low-overhead alternative to the CustomOps.

``libfusedres_mxop.so`` (csrc/mxop, built next to ``fusedres/_C``) is an MXNet external
operator library: ``mx.library.load`` registers ``_fusedres_conv1d_bn_relu`` and
``_fusedres_add_relu`` as ordinary operators (``mx.nd._internal`` / ``mx.sym._internal``), with
the per-call cost of a built-in op instead of a Python callback (~2 ms per forward+backward for
a CustomOp). They run on the CPU, hybridize and export; a process that imports an exported
model must call :func:`load` (or ``mx.library.load(library_path())``) before
``SymbolBlock.imports``.

Same contract as :mod:`fusedres.ops` (arguments, attributes, running statistics, inference
folding), with what MXNet 1.9.1's library API cannot express:

* It never tells an op its ``req``: gradients are always *written*. Anything that asks MXNet to
  accumulate into a gradient (``kAddTo``) silently loses the accumulation. That is
  ``grad_req='add'`` on a parameter or an input, and MXNet's own in-place gradient aggregation
  (``DetectInplaceAddTo``), which the legacy GraphExecutor (``Symbol.bind``/``simple_bind``,
  Module) always runs and Gluon runs for ``hybridize(static_alloc=True)`` backward, whenever an
  array feeds several consumers (a residual skip). Imperative autograd and the default
  ``hybridize()`` never use ``kAddTo`` for that; they sum the branches with ``_grad_add``
  instead. Use :func:`native_ok` to decide, and the CustomOps where it says no.
  (``MXNET_EXEC_ENABLE_ADDTO`` is documented for MXNet but not read by 1.9.1's sources; it is
  treated as a refusal here in case a build honours it.)
* It never tells an op whether it runs in training mode: the conv op reads MXNet's training
  flag when its state is created, on the calling thread (imperative calls, and each run of a
  hybridized block). The GraphExecutor creates the state once, at bind time, so its
  ``forward(is_train=...)`` is not honoured: do not train through ``Symbol.bind`` with it.
* Shape inference needs every input's rank known (Gluon always gives it); a bare
  ``mx.sym.var`` without a shape makes MXNet 1.9.1's lib_api shape callback fail with
  ``std::bad_alloc`` before the op sees it.
"""
import contextlib
import os
import re
import threading
from pathlib import Path

import mxnet as mx

from ._common import conv_attrs

CONV1D_BN_RELU = "_fusedres_conv1d_bn_relu"
ADD_RELU = "_fusedres_add_relu"
LIBRARY_NAME = "libfusedres_mxop.so"

_lock = threading.Lock()
_state = {"loaded": None, "error": None}


def library_path():
    """Where the native op library is: $FUSEDRES_MXOP_LIB, else next to fusedres/_C."""
    env = os.environ.get("FUSEDRES_MXOP_LIB")
    if env:
        return str(Path(env).resolve())
    return str((Path(__file__).resolve().parent.parent / LIBRARY_NAME))


def load():
    """Load the library into MXNet once per process; returns its path or raises RuntimeError."""
    with _lock:
        if _state["loaded"]:
            return _state["loaded"]
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        path = library_path()
        try:
            if not os.path.exists(path):
                raise RuntimeError(
                    f"{path} does not exist (it is built with fusedres when MXNet is importable "
                    "at build time; rebuild with `pip install -e .`, or set FUSEDRES_MXOP_LIB)")
            if not hasattr(mx, "library") or not hasattr(mx.library, "load"):
                raise RuntimeError(f"MXNet {mx.__version__} has no mx.library.load")
            try:
                mx.library.load(path, verbose=False)
            except TypeError:  # older signature without verbose
                mx.library.load(path)
            except mx.base.MXNetError as err:
                raise RuntimeError(f"mx.library.load({path}) failed: {err}") from None
            if not (hasattr(mx.nd._internal, CONV1D_BN_RELU)
                    and hasattr(mx.nd._internal, ADD_RELU)):
                raise RuntimeError(f"{path} loaded but did not register {CONV1D_BN_RELU} and "
                                   f"{ADD_RELU}")
        except RuntimeError as err:
            _state["error"] = str(err)
            raise
        _state["loaded"] = path
        return path


def available():
    """(True, path) when the native ops are registered (loading them if needed), else
    (False, reason)."""
    try:
        return True, load()
    except RuntimeError as err:
        return False, str(err)


def native_ok(params=(), ctx=None, static_alloc=False):
    """Whether the native ops compute what the CustomOps would for this use; (bool, reason).

    params: Parameters (or a ParameterDict) the op takes gradients for; grad_req 'add' needs
        accumulation, which the native ops cannot do (MXNet does not pass them req).
    ctx: the data's context; the native ops run on the CPU only.
    static_alloc: the block is hybridized with static_alloc=True, whose backward lets MXNet
        accumulate branch gradients in place (kAddTo) into the native op's outputs.
    """
    ok, why = available()
    if not ok:
        return False, why
    if ctx is None and mx.runtime.Features().is_enabled("CUDA"):
        return False, "the data's device is unknown and this MXNet has GPUs; CPU only"
    if ctx is not None and ctx.device_type not in ("cpu", "cpu_pinned", "cpu_shared"):
        return False, f"data is on {ctx}; the native ops run on the CPU only"
    if hasattr(params, "values"):
        params = params.values()
    for p in params:
        if p is not None and getattr(p, "grad_req", "write") == "add":
            return False, (f"parameter {p.name} has grad_req='add'; the native ops cannot "
                           "accumulate gradients (MXNet's library API does not pass req)")
    if static_alloc:
        return False, ("hybridize(static_alloc=True) backward may ask the op to accumulate a "
                       "branch gradient in place (kAddTo), which the native ops cannot do")
    if os.environ.get("MXNET_EXEC_ENABLE_ADDTO", "0") not in ("", "0"):
        return False, "MXNET_EXEC_ENABLE_ADDTO is set: MXNet may ask for kAddTo gradients"
    return True, "native"


_TYPE_ERROR = re.compile(r"dtype|must be float32|must be an int|must be a number|must be a bool")
_EXT_MSG = re.compile(r"\]: (.*)$", re.M)


@contextlib.contextmanager
def translate_errors():
    """Re-raise a native op's validation failure (an MXNetError carrying the library's
    message) as the ValueError/TypeError the CustomOps raise, with the same message."""
    try:
        yield
    except (mx.base.MXNetError, ValueError) as err:
        text = str(err)
        if "_fusedres_" not in text or "Extension Traceback" not in text:
            raise
        msgs = _EXT_MSG.findall(text.split("Extension Traceback", 1)[1])
        if not msgs:
            raise
        msg = msgs[-1].strip()
        cls = TypeError if _TYPE_ERROR.search(msg) else ValueError
        raise cls(msg) from err


def _namespace(x):
    return mx.sym if isinstance(x, mx.sym.Symbol) else mx.nd


def _invoke(F, op_name, *args, **kwargs):
    load()
    op = getattr(F._internal, op_name)
    if F is mx.sym:
        return op(*args, **kwargs)
    with translate_errors():
        return op(*args, **kwargs)


def conv1d_bn_relu(data, weight, bias, gamma, beta, running_mean, running_var, *, kernel,
                   num_filter, stride=1, pad=0, dilate=1, num_group=1, eps=1e-5, momentum=0.9,
                   use_global_stats=False, relu=True, name=None, F=None):
    """Native relu(BatchNorm(Convolution(data))): same signature and semantics as
    :func:`fusedres.ops.conv1d_bn_relu` (see this module's notes on req and training mode)."""
    F = F or _namespace(data)
    args = [data, weight] + ([] if bias is None else [bias]) + [gamma, beta, running_mean,
                                                               running_var]
    kw = conv_attrs(kernel, num_filter, stride=stride, pad=pad, dilate=dilate,
                    num_group=num_group, no_bias=bias is None, eps=eps, momentum=momentum,
                    use_global_stats=use_global_stats, relu=relu)
    if name is not None:
        kw["name"] = name
    return _invoke(F, CONV1D_BN_RELU, *args, **kw)


def add_relu(lhs, rhs, name=None, F=None):
    """Native relu(lhs + rhs) for arrays or Symbols of the same shape."""
    F = F or _namespace(lhs)
    kw = {} if name is None else {"name": name}
    return _invoke(F, ADD_RELU, lhs, rhs, **kw)


__all__ = ["available", "load", "library_path", "native_ok", "translate_errors",
           "conv1d_bn_relu", "add_relu", "CONV1D_BN_RELU", "ADD_RELU"]
