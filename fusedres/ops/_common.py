"""What both op families share: argument parsing, error reporting, device backends, req."""
import ast
import ctypes
import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import mxnet as mx
import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)

_last_error = threading.local()


def record_error(exc):
    """Remember a validation error raised inside an MXNet callback on this thread.

    MXNet swallows exceptions raised in CustomOpProp callbacks and raises a bare MXNetError
    ("Check failed: ...") instead; the ops record the real error here so the Python-facing
    entry points can re-raise it with its message (see ``translate_errors``).
    """
    _last_error.exc = exc
    return exc


@contextmanager
def translate_errors():
    """Turn the MXNetError of a failed fusedres callback back into the error it hid."""
    _last_error.exc = None
    try:
        yield
    except (mx.base.MXNetError, ValueError) as err:
        # Gluon's deferred init re-raises the MXNetError as a ValueError.
        hidden, _last_error.exc = getattr(_last_error, "exc", None), None
        if hidden is not None and hidden is not err:
            raise hidden from err
        raise


def check_no_zero_size(name, shape):
    # Under numpy shape semantics 0 is a real (empty) dimension; in legacy mode it means
    # "unknown" and MXNet itself refuses to create such an array.
    if mx.util.is_np_shape() and 0 in shape:
        raise record_error(ValueError(
            f"{name} must have no zero-size dimension, got shape {tuple(shape)}"))


# Defaults of the conv op's attributes (mirrored by the CustomOpProp and csrc/mxop).
CONV_DEFAULTS = dict(stride=1, pad=0, dilate=1, num_group=1, no_bias=False, eps=1e-5,
                     momentum=0.9, use_global_stats=False, relu=True)


def conv_attrs(kernel, num_filter, **given):
    """The conv op's attributes, leaving out those at their default: MXNet hands every
    attribute to the op on each call as strings (the native op's per-call cost grows with
    them, by about a third at a tiny shape), and the saved graphs get shorter."""
    attrs = dict(kernel=kernel, num_filter=num_filter)
    attrs.update({k: v for k, v in given.items() if v != CONV_DEFAULTS[k]})
    return attrs


def parse_bool(value):
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "1")


def parse_int(value, name, minimum):
    try:
        parsed = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(parsed, (tuple, list)):
        if len(parsed) != 1:
            raise ValueError(f"{name} must be a single int or a 1-tuple, got {value}")
        parsed = parsed[0]
    if isinstance(parsed, bool) or not isinstance(parsed, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if parsed < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {parsed}")
    return int(parsed)


def parse_float(value, name):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


def mx_dtype(type_id):
    """numpy dtype of an MXNet type id, as create_operator receives them."""
    return np.dtype(mx.ndarray.ndarray._DTYPE_MX_TO_NP[type_id])


def check_dtypes(names, dtypes, allowed=FLOAT_DTYPES):
    """All tensors share the data's floating dtype; returns that numpy type.

    An unknown dtype (None) takes the data's; the data's own may come from another argument.
    """
    known = [(n, np.dtype(t)) for n, t in zip(names, dtypes) if t is not None]
    if not known:
        return np.float32
    name0, first = known[0]
    if first.type not in allowed:
        kinds = " or ".join(np.dtype(t).name for t in allowed)
        raise record_error(TypeError(f"{name0} must be {kinds}, got {first.name}"))
    for name, dt in known[1:]:
        if dt != first:
            raise record_error(TypeError(
                f"{name} must have the same dtype as {name0} ({first.name}), got {dt.name}"))
    return first.type


def _mx_data_pointer(arr):
    ptr = ctypes.c_void_p()
    mx.base.check_call(mx.base._LIB.MXNDArrayGetData(arr.handle, ctypes.byref(ptr)))
    return ptr.value


class _MarkedInputs:
    """The grad_req of NDArrays marked with ``attach_grad``, which MXNet cannot report back.

    ``NDArray.attach_grad`` is wrapped to note, per array, the address of the gradient buffer
    it attached and the grad_req; a lookup is trusted only while the array's gradient buffer
    is still that one. The native ops need it: they cannot accumulate into an input's
    gradient, so an input marked 'add' (or marked some other way) must go to the CustomOps.
    """

    _MAX = 4096  # most recent markings kept

    def __init__(self):
        self._reqs = OrderedDict()
        self._lock = threading.Lock()
        original = mx.nd.NDArray.attach_grad
        if getattr(original, "_fusedres_wrapped", False):
            return
        table = self

        def attach_grad(self, grad_req="write", stype=None):
            original(self, grad_req, stype)
            table._note(self, grad_req)
        attach_grad.__doc__ = original.__doc__
        attach_grad._fusedres_wrapped = True
        mx.nd.NDArray.attach_grad = attach_grad

    def _note(self, arr, grad_req):
        grad = arr.grad
        if grad is None or grad.stype != "default":
            return
        with self._lock:
            self._reqs[arr.handle.value] = (_mx_data_pointer(grad), grad_req)
            self._reqs.move_to_end(arr.handle.value)
            while len(self._reqs) > self._MAX:
                self._reqs.popitem(last=False)

    def may_accumulate(self, arr):
        """False when arr is not marked, or marked by attach_grad with 'write' or 'null'."""
        grad = arr.grad
        if grad is None:
            return False
        entry = self._reqs.get(arr.handle.value)
        if entry is None or entry[0] != _mx_data_pointer(grad):
            return True  # marked in a way we did not see: assume the worst
        return entry[1] == "add"


marked_inputs = _MarkedInputs()


def numpy_view(arr):
    """Zero-copy, writable numpy view of a dense CPU NDArray.

    Safe inside a CustomOp callback: MXNet has finished the inputs before calling it and
    waits for the callback before anyone reads the outputs.
    """
    dtype = np.dtype(arr.dtype)
    count = int(np.prod(arr.shape))
    buf = (ctypes.c_char * (count * dtype.itemsize)).from_address(_mx_data_pointer(arr))
    return np.frombuffer(buf, dtype=dtype).reshape(arr.shape)


class CPUBackend:
    name = "cpu"

    def __init__(self):
        from .. import _C
        self.kernels = _C

    view = staticmethod(numpy_view)
    view_out = staticmethod(numpy_view)
    empty = staticmethod(np.empty)

    @staticmethod
    def scope():
        return nullcontext()


class GPUBackend:
    """CUDA kernels through CuPy (fusedres.cuda); MXNet memory is shared through DLPack."""
    name = "gpu"

    def __init__(self, device_id):
        from .. import cuda
        ok, why = cuda.available()
        if not ok:
            raise record_error(ValueError(
                f"data is on gpu({device_id}) but fusedres's CUDA kernels are unavailable: {why}"))
        import cupy
        self.kernels, self._cupy, self.ctx = cuda, cupy, mx.gpu(device_id)

    def view(self, arr):
        return self.kernels.from_mxnet(arr)

    def view_out(self, arr):
        return self.kernels.from_mxnet(arr, writable=True)

    def empty(self, shape, dtype):
        with self._cupy.cuda.Device(self.ctx.device_id):
            return self._cupy.empty(shape, dtype=dtype)

    def scope(self):
        # Kernels run on CuPy's current stream; MXNet 1.9.1 has no stream handshake for
        # CustomOps, so the scope synchronizes that stream before the callback returns and
        # MXNet reads the outputs.
        return self.kernels.mxnet_scope(self.ctx)


def backend_for(ctx):
    if ctx.device_type == "cpu" or ctx.device_type == "cpu_pinned":
        return CPUBackend()
    if ctx.device_type == "gpu":
        return GPUBackend(ctx.device_id)
    raise record_error(ValueError(f"data is on an unsupported device {ctx}"))


class Target:
    """Where one kernel output goes, honouring MXNet's req.

    ``write``/``inplace``: the kernel writes straight into the NDArray's memory.
    ``add``: the kernel writes a scratch buffer that is then added in place.
    ``null``: the output is not wanted; ``buf`` is None and the kernel skips it.
    """

    def __init__(self, backend, req, arr):
        self.req = req
        self.dst = None if req == "null" else backend.view_out(arr)
        if req == "add":
            self.buf = backend.empty(arr.shape, self.dst.dtype)
        else:
            self.buf = self.dst

    def commit(self):
        if self.req == "add":
            self.dst += self.buf
