"""Argument checks of the CUDA kernel functions, mirroring csrc/bindings.cpp: each failure is a
TypeError or ValueError that names the argument."""
import numpy as np

from ..attrs import MAX_EXTENT as INT32_MAX  # any hyper-parameter, dimension or tensor size
from .loader import import_cupy

# Kernel name suffix by dtype: the data types the kernels take.
SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def shape_str(shape):
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check(a, name, max_elements=INT32_MAX):
    """a must be a C-contiguous float32/float16 CuPy array on the current device."""
    cp = import_cupy()
    if not isinstance(a, cp.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(a).__name__}")
    if a.dtype not in SUFFIX:
        raise TypeError(f"{name} must be float32 or float16, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    dev = cp.cuda.Device().id
    if a.device.id != dev:
        raise ValueError(f"{name} is on GPU {a.device.id} but the current device is GPU {dev}")
    if a.size > max_elements:
        raise ValueError(f"{name} has {a.size} elements; the CUDA kernels take at most "
                         f"{max_elements}")
    return a


def check_opt(a, name, max_elements=INT32_MAX):
    """check for an optional array: None stays None."""
    return None if a is None else check(a, name, max_elements)


def same_dtype(dtype, args, ref_name):
    for a, name in args:
        if a is not None and a.dtype != dtype:
            raise TypeError(f"{name} must have the same dtype as {ref_name}")


def expect(a, name, shape):
    if a is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_str(shape)}, got {shape_str(a.shape)}")


def require(ok, msg):
    if not ok:
        raise ValueError(msg)
