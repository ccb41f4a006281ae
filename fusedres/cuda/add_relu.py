"""add_relu on CuPy arrays: the checks and launch heuristics of csrc/cuda/add_relu.cu."""
import numpy as np

from . import loader
from .checks import SUFFIX, check, check_opt, expect, require, same_dtype, shape_str
from .loader import THREADS, cdiv, ptr, sm_count

# Entry points of csrc/cuda/add_relu.cu, as launched below (tests check the cubins have them).
KERNELS = tuple(f"add_relu_{d}_{s}" for d in ("forward", "backward") for s in ("f32", "f16"))

_SOURCE = "add_relu"


def _elementwise_grid(n, dtype):
    per_thread = 16 // np.dtype(dtype).itemsize  # one 16-byte vector
    return (max(1, min(cdiv(n, per_thread * THREADS), 32 * sm_count())),)


def add_relu_forward(lhs, rhs, out):
    """out = max(lhs + rhs, 0)."""
    a, b, y = check(lhs, "lhs"), check(rhs, "rhs"), check(out, "output")
    same_dtype(a.dtype, [(b, "rhs"), (y, "output")], "lhs")
    require(a.shape == b.shape, "lhs and rhs must have the same shape, got "
                                f"{shape_str(a.shape)} and {shape_str(b.shape)}")
    expect(y, "output", a.shape)
    if a.size:
        loader.launch(_SOURCE, f"add_relu_forward_{SUFFIX[a.dtype]}",
                      _elementwise_grid(a.size, a.dtype), (THREADS,), (np.int64(a.size), a, b, y))


def add_relu_backward(out_grad, out, lhs_grad, rhs_grad):
    """lhs_grad = rhs_grad = out_grad * (out > 0); a None gradient is not written."""
    dy, y = check(out_grad, "out_grad"), check(out, "output")
    da, db = check_opt(lhs_grad, "lhs_grad"), check_opt(rhs_grad, "rhs_grad")
    same_dtype(y.dtype, [(dy, "out_grad"), (da, "lhs_grad"), (db, "rhs_grad")], "output")
    expect(dy, "out_grad", y.shape)
    expect(da, "lhs_grad", y.shape)
    expect(db, "rhs_grad", y.shape)
    if y.size and (da is not None or db is not None):
        loader.launch(_SOURCE, f"add_relu_backward_{SUFFIX[y.dtype]}",
                      _elementwise_grid(y.size, y.dtype), (THREADS,),
                      (np.int64(y.size), dy, y, ptr(da), ptr(db)))
