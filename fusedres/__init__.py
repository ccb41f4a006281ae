"""fusedres: fused conv1d+batchnorm+relu and add+relu for MXNet Gluon, on CPU and CUDA.

``import fusedres`` registers the CustomOps ``fusedres_conv1d_bn_relu`` and
``fusedres_add_relu``; ``fusedres.nn`` holds the Gluon blocks built on them.
"""
import os

__version__ = "0.1.0"

# The wheels' OpenMP runtime, libiomp5, registers fork handlers (when it starts, at the first
# fused op) that take its global locks; MXNet's fork handler, registered before them and so run
# after, then joins MXNet's worker threads, which need those locks to exit: every fork after a
# fused op (os.fork, multiprocessing, subprocess on Python < 3.10) hung. Without libiomp5's
# handlers a fork goes as with libgomp, the source build's runtime (tools/wheel_smoke.py checks).
os.environ.setdefault("KMP_INIT_AT_FORK", "FALSE")

try:
    import mxnet  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "fusedres needs MXNet 1.9.1. Install the CPU build with `pip install fusedres[cpu]` "
        "(mxnet==1.9.1) or a GPU build with `pip install fusedres[gpu]` (mxnet-cu112==1.9.1); "
        "MXNet 1.9.1 needs numpy<1.24.") from err

from . import nn, ops  # noqa: E402
from .fuse import FuseReport, fuse, load_unfused_parameters  # noqa: E402
from .ops import add_relu, conv1d_bn_relu, conv1d_bn_relu_symbol  # noqa: E402

__all__ = ["nn", "ops", "conv1d_bn_relu", "conv1d_bn_relu_symbol", "add_relu", "fuse", "FuseReport",
           "load_unfused_parameters", "__version__"]
