"""Loading and launching the CUDA kernels: CuPy, the cubin or NVRTC source for the device, once.

At run time the cubin shipped in ``fusedres/cubins`` (tools/build_cubins.py) for the device's
compute capability is loaded; without one (or with FUSEDRES_CUDA_FROM_SOURCE set) the source is
compiled by CuPy's NVRTC with build_options.NVRTC_OPTIONS, and CuPy caches it on disk. Modules
and device attributes are cached per device. Every launch goes through ``launch``, on CuPy's
current stream; nothing here synchronizes.
"""
import os
import threading
from pathlib import Path

import numpy as np

from .build_options import NVRTC_OPTIONS

_PKG = Path(__file__).resolve().parent.parent   # fusedres/
CUBIN_DIR = _PKG / "cubins"
SOURCE_DIR = _PKG.parent / "csrc" / "cuda"        # a source checkout
if not SOURCE_DIR.is_dir():
    SOURCE_DIR = _PKG / "cuda_src"                 # an installed wheel ships them as package data

THREADS = 256       # threads per block of every kernel launched through fusedres.cuda
NULL = np.uint64(0)  # a null pointer argument


def available():
    """(True, description) when CuPy can use a CUDA device, else (False, reason). Never raises."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CuPy whose CUDA libraries fail to load
        return False, f"cupy is not importable ({type(e).__name__}: {e})"
    try:
        # Raises CUDARuntimeError (not 0) on a machine without a driver or GPU.
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"no usable CUDA device ({type(e).__name__}: {e})"
    if count < 1:
        return False, "no CUDA device"
    return True, f"{count} CUDA device(s), cupy {cupy.__version__}"


def import_cupy():
    """CuPy, imported on first use: importing fusedres.cuda never needs it."""
    import cupy
    return cupy


_lock = threading.Lock()
_modules = {}   # (source name, device id) -> cupy.RawModule
_sm_counts = {}


def cubin_for(name, major, minor):
    """Shipped cubin that runs on compute capability major.minor: same major, minor <= ours."""
    best = None
    for path in CUBIN_DIR.glob(f"{name}.sm_*.cubin"):
        arch = path.name[len(name) + 4:-len(".cubin")]
        if arch.isdigit() and len(arch) >= 2:
            a_major, a_minor = int(arch[:-1]), int(arch[-1])
            if a_major == major and a_minor <= minor and (best is None or a_minor > best[0]):
                best = (a_minor, path)
    return best[1] if best else None


def nvrtc_include_dirs():
    dirs = [str(SOURCE_DIR)]
    try:  # headers such as cuda_fp16.h when CUDA comes from pip wheels rather than a toolkit
        import nvidia.cuda_runtime
        dirs += [str(Path(p) / "include") for p in nvidia.cuda_runtime.__path__
                 if (Path(p) / "include").is_dir()]
    except ImportError:
        pass
    return dirs


def module(name):
    """The RawModule of csrc/cuda/<name>.cu for the current device, loaded once."""
    cp = import_cupy()
    dev = cp.cuda.Device()
    key = (name, dev.id)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            cc = dev.compute_capability  # e.g. "86"
            cubin = cubin_for(name, int(cc[:-1]), int(cc[-1]))
            if cubin is not None and not os.environ.get("FUSEDRES_CUDA_FROM_SOURCE"):
                mod = cp.RawModule(path=str(cubin))
            else:
                src = SOURCE_DIR / f"{name}.cu"
                if not src.is_file():
                    raise RuntimeError(f"no cubin for sm_{cc} in {CUBIN_DIR} and no source "
                                       f"{src} to compile; run tools/build_cubins.py")
                options = NVRTC_OPTIONS + tuple(f"-I{d}" for d in nvrtc_include_dirs())
                mod = cp.RawModule(code=src.read_text(), options=options)  # CuPy caches on disk
            _modules[key] = mod
        return mod


def sm_count():
    """Streaming multiprocessors of the current device, which the launch heuristics fill."""
    cp = import_cupy()
    dev = cp.cuda.Device()
    if dev.id not in _sm_counts:
        _sm_counts[dev.id] = dev.attributes["MultiProcessorCount"]
    return _sm_counts[dev.id]


def launch(source, kernel, grid, block, args):
    """Launches kernel of csrc/cuda/<source>.cu on CuPy's current stream.

    grid and block are explicit tuples; scalars in args must already be typed numpy scalars
    (np.int32, np.int64, np.float32, np.float64) matching the kernel's C signature: CuPy would
    pass a Python int or float as 8 bytes whatever the parameter's type.
    """
    for i, a in enumerate(args):
        # np.float64 is a subclass of float: only plain Python numbers lack a C type.
        if isinstance(a, (int, float, bool)) and not isinstance(a, np.generic):
            raise TypeError(f"{kernel}: argument {i} is a Python {type(a).__name__} ({a!r}); "
                            "pass a numpy scalar of the parameter's C type")
    module(source).get_function(kernel)(tuple(grid), tuple(block), tuple(args))


def ptr(a):
    """a, or a null pointer for None (an optional array)."""
    return NULL if a is None else a


def cdiv(a, b):
    return -(-a // b)
