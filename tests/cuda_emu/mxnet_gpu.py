"""fusedres's GPU backend driven by MXNet CPU NDArrays, on the CUDA emulation.

Without an MXNet GPU build, the code between MXNet and the CUDA kernels (the GPU branch of
fusedres.ops.backends, fusedres.cuda.from_mxnet and mxnet_scope, the CustomOps' device-side
req and auxiliary-state handling, float16 data with float32 BatchNorm arrays) has no GPU
NDArray to run on. The emulation's device memory is host memory, so CPU NDArrays can stand in
for GPU ones: inside ``cpu_as_gpu()``

* ``import cupy`` gives the emulation's stand-in (fake_cupy), in the schedule asked for;
* fusedres.cuda.GPU_DEVICE_TYPES (set in fusedres.cuda.mxnet_interop) also names "cpu", the
  one test hook in the package: CPU contexts get the GPU backend
  (fusedres.ops.backends.backend_for), and from_mxnet views CPU NDArrays through
  ``to_dlpack_for_read``/``to_dlpack_for_write`` and the stand-in's ``from_dlpack`` (MXNet's
  own DLPack export, unchanged);
* fusedres.cuda.loader's per-device caches start empty and are restored on the way out, after
  MXNet has run every queued callback (mx.nd.waitall()), while the stand-in is still there.

Everything else is the production path: the blocks and functional forms with
``use_native=False`` (or FUSEDRES_NATIVE=0) pick the CustomOps, MXNet runs their callbacks on
its own threads, and the kernels run on the emulation. CustomOps created inside the block keep
their GPU backend; use them there only.
"""
import contextlib

import pytest

from . import fake_cupy


@contextlib.contextmanager
def cpu_as_gpu(schedule="plain"):
    import mxnet as mx

    from fusedres.cuda import loader, mxnet_interop
    with fake_cupy.installed(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(fake_cupy.config, "schedule", schedule)
        mp.setattr(loader, "_modules", {})
        mp.setattr(loader, "_sm_counts", {})
        mp.setattr(mxnet_interop, "GPU_DEVICE_TYPES", mxnet_interop.GPU_DEVICE_TYPES + ("cpu",))
        try:
            yield fake_cupy
        finally:
            mx.nd.waitall()
