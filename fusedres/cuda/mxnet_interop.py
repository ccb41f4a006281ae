"""MXNet NDArrays for the kernels: DLPack views, and the scope that keeps MXNet and CuPy in
step (MXNet 1.9.1 cannot be told about CuPy's stream)."""
import contextlib

from .loader import import_cupy

# Device types of the MXNet contexts whose arrays from_mxnet views and whose ops the GPU
# backend of fusedres.ops serves (fusedres.cuda.GPU_DEVICE_TYPES reads this one): MXNet's GPUs.
# The test hook: tests/cuda_emu/mxnet_gpu.py adds "cpu" here to drive that backend
# with CPU NDArrays on the CUDA emulation, whose device memory is the host's (a real
# cupy.from_dlpack refuses a CPU capsule).
GPU_DEVICE_TYPES = ("gpu",)


def from_mxnet(arr, writable=False):
    """A CuPy view (no copy) of an MXNet GPU NDArray, through DLPack.

    writable=True exports with ``to_dlpack_for_write`` (MXNet waits for pending reads and
    writes), otherwise ``to_dlpack_for_read`` (waits for pending writes). Call inside
    ``mxnet_scope(arr.context)``.
    """
    cp = import_cupy()
    ctx = arr.context
    if ctx.device_type not in GPU_DEVICE_TYPES:
        raise ValueError(f"from_mxnet needs a GPU NDArray, got one on {ctx}")
    capsule = arr.to_dlpack_for_write() if writable else arr.to_dlpack_for_read()
    with cp.cuda.Device(ctx.device_id):
        return cp.from_dlpack(capsule)


@contextlib.contextmanager
def mxnet_scope(ctx):
    """Selects ctx's GPU for CuPy and synchronizes CuPy's current stream on the way out.

    MXNet 1.9.1 cannot be told about CuPy's stream, so kernels launched here must have
    finished before an MXNet operator callback returns and MXNet reuses the buffers.
    """
    cp = import_cupy()
    with cp.cuda.Device(ctx.device_id):
        try:
            yield
        finally:
            cp.cuda.get_current_stream().synchronize()
