"""CUDA kernels for fusedres, through CuPy: the only package that imports CuPy.

Kernels live in ``csrc/cuda/*.cu`` (shipped in wheels as ``fusedres/cuda_src/``), each compiled
ahead of time to the cubins in ``fusedres/cubins`` or, when none fits the device, at run time by
CuPy's NVRTC. The package mirrors ``csrc/cuda/``:

- ``build_options``: the NVRTC options and the cubin arch list, defined once;
- ``loader``: CuPy, the cubin or source for the device, the module cache, ``launch``;
- ``checks``: the argument checks every kernel function shares;
- ``conv1d_bn_relu``, ``add_relu``: one module per op family (its shape checks, its launch
  heuristics, its kernels' entry points);
- ``mxnet_interop``: DLPack views of MXNet NDArrays and ``mxnet_scope``.

The functions mirror the CPU binding ``fusedres._C`` on CuPy arrays: same names, arguments and
checks (ValueError/TypeError naming the argument), outputs written in place. Data may be float32
or float16; the per-channel batchnorm arrays (gamma, beta, running and saved statistics) have
the data's dtype or float32, as Gluon keeps them under ``cast('float16')``.

Numbers: NaN and infinities propagate as MXNet's relu and BatchNorm and the numpy reference
give them (relu(NaN) = NaN, gradient dy * relu'(pre) with relu'(NaN) = NaN, BatchNorm computed
as (z - mean) * gamma * invstd + beta, inference included: nothing is folded).

Limits: every hyper-parameter, dimension and tensor size the ops accept (up to 2**31 - 1,
fusedres.attrs.MAX_EXTENT), except that the conv kernels take tensors of at most
2**31 - 2**16 elements, num_group at most 65535 (depthwise convolutions: any) and 65535 * 64
channels per group: beyond, a
ValueError names the argument.

Streams: every kernel is launched on CuPy's current stream and nothing here synchronizes.
MXNet 1.9.1 has no stream handshake (DLPack without ``__dlpack__``), so code handing MXNet
arrays to these functions must run them inside ``mxnet_scope(ctx)``, which selects the
NDArray's device and synchronizes the stream before returning control to MXNet.

Importing this package never needs CuPy or MXNet; CuPy is imported inside the functions.
"""
from . import add_relu, conv1d_bn_relu, mxnet_interop
from .add_relu import add_relu_backward, add_relu_forward
from .build_options import NVRTC_OPTIONS
from .conv1d_bn_relu import (conv1d_bn_relu_backward, conv1d_bn_relu_forward_infer,
                             conv1d_bn_relu_forward_train)
from .loader import CUBIN_DIR, SOURCE_DIR, available
from .mxnet_interop import from_mxnet, mxnet_scope

__all__ = ["CUBIN_DIR", "GPU_DEVICE_TYPES", "KERNELS", "NVRTC_OPTIONS", "SOURCE_DIR",
           "add_relu_backward", "add_relu_forward", "available", "conv1d_bn_relu_backward",
           "conv1d_bn_relu_forward_infer", "conv1d_bn_relu_forward_train", "from_mxnet",
           "mxnet_scope"]

# Entry points of each csrc/cuda/<name>.cu, as its module launches them (tests check the
# cubins have them).
KERNELS = {"add_relu": add_relu.KERNELS, "conv1d_bn_relu": conv1d_bn_relu.KERNELS}


def __getattr__(name):
    # GPU_DEVICE_TYPES, the test hook, is mxnet_interop's (set it there): read from there, so
    # that fusedres.ops.backends.backend_for and from_mxnet always agree.
    if name == "GPU_DEVICE_TYPES":
        return mxnet_interop.GPU_DEVICE_TYPES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
