"""Where the CustomOps' kernels run: the CPU (fusedres._C on numpy views) or a GPU
(fusedres.cuda on CuPy views, through DLPack), and how an output honours MXNet's req."""
import ctypes
from contextlib import nullcontext

import mxnet as mx
import numpy as np

from .. import cuda
from .errors import record_error

CPU_DEVICES = ("cpu", "cpu_pinned", "cpu_shared")


def is_cpu(ctx):
    """Whether an MXNet context is host memory (the one place this is decided)."""
    return ctx.device_type in CPU_DEVICES


def mx_dtype(type_id):
    """numpy dtype of an MXNet type id, as create_operator receives them."""
    return np.dtype(mx.ndarray.ndarray._DTYPE_MX_TO_NP[type_id])


def _mx_data_pointer(arr):
    ptr = ctypes.c_void_p()
    mx.base.check_call(mx.base._LIB.MXNDArrayGetData(arr.handle, ctypes.byref(ptr)))
    return ptr.value


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

    def __init__(self, ctx):
        ok, why = cuda.available()
        if not ok:
            raise record_error(ValueError(
                f"data is on {ctx} but fusedres's CUDA kernels are unavailable: {why}"))
        import cupy
        self.kernels, self._cupy, self.ctx = cuda, cupy, ctx

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
    if ctx.device_type in cuda.GPU_DEVICE_TYPES:
        return GPUBackend(ctx)
    if is_cpu(ctx):
        return CPUBackend()
    raise record_error(ValueError(f"data is on an unsupported device {ctx}"))


# The dtypes of data each backend's kernels take (the BatchNorm arrays may be float32 with
# float16 data), and where, for messages.
_DATA_DTYPES = {"cpu": ((np.float32, np.float64), "on the CPU"),
                "gpu": ((np.float32, np.float16), "on a GPU")}


def check_data_dtype(backend, dtype, name):
    """Raises a TypeError naming the input unless the backend's kernels take data of dtype."""
    allowed, where = _DATA_DTYPES[backend.name]
    if dtype not in allowed:
        kinds = " or ".join(np.dtype(t).name for t in allowed)
        raise record_error(TypeError(
            f"{name} must be {kinds} {where}, got {np.dtype(dtype).name}"))


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


__all__ = ["is_cpu", "backend_for", "check_data_dtype", "CPUBackend", "GPUBackend", "Target",
           "numpy_view", "mx_dtype"]
