"""Shared test configuration: the tolerance table, random inputs, and MXNet helpers."""
import sys
import types
from pathlib import Path

import numpy as np
import pytest

try:
    import mxnet  # noqa: F401
except ImportError:
    # The CUDA kernel tests also run on GPU machines without MXNet: make the MXNet-free
    # submodules (fusedres.reference, fusedres.cuda) importable without fusedres/__init__.py,
    # which insists on MXNet.
    _pkg = types.ModuleType("fusedres")
    _pkg.__path__ = [str(Path(__file__).resolve().parent.parent / "fusedres")]
    sys.modules["fusedres"] = _pkg

# One tolerance table keyed by dtype: max |actual - expected| over max(|expected|, 1).
# float32 results are judged against the float64 reference of the same (float32) inputs.
TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 2e-4, np.dtype(np.float16): 1e-2}

# MXNet keeps BatchNorm's momentum as a C float; the ops round it the same way.
MOMENTUM = float(np.float32(0.9))

# (N, C_in, W, C_out, kernel, stride, pad, dilation, groups, bias): odd sizes on purpose.
CONV_CASES = [
    pytest.param((2, 7, 97, 7, 3, 1, 1, 1, 1, True), id="c7-w97"),
    pytest.param((3, 64, 33, 64, 3, 1, 1, 1, 1, True), id="c64"),
    pytest.param((2, 6, 41, 10, 3, 2, 1, 1, 1, True), id="stride2"),
    pytest.param((2, 5, 37, 7, 3, 1, 2, 2, 1, True), id="dilation2"),
    pytest.param((2, 8, 29, 6, 5, 1, 2, 1, 2, True), id="groups2"),
    pytest.param((3, 7, 23, 9, 3, 1, 0, 1, 1, False), id="no-bias-pad0"),
    pytest.param((1, 3, 5, 4, 5, 3, 2, 1, 1, True), id="lout1-ish"),
]


def assert_close(actual, expected, dtype, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1.0)
    assert err <= TOL[np.dtype(dtype)], f"{what}: relative error {err:.3g} ({np.dtype(dtype)})"


def conv_inputs(case, dtype, seed=0):
    """Random inputs for a conv case, as numpy arrays of dtype."""
    n, cin, width, cout, k, stride, pad, dil, groups, bias = case
    rng = np.random.default_rng(seed)
    d = dict(
        data=rng.standard_normal((n, cin, width)),
        weight=rng.standard_normal((cout, cin // groups, k)) / np.sqrt(cin // groups * k),
        bias=rng.standard_normal(cout) if bias else None,
        gamma=rng.uniform(0.5, 1.5, cout),
        beta=rng.standard_normal(cout) * 0.5,
        running_mean=rng.standard_normal(cout) * 0.1,
        running_var=rng.uniform(0.5, 2.0, cout),
    )
    conv = dict(kernel=k, stride=stride, pad=pad, dilate=dil, num_group=groups, num_filter=cout)
    return {key: (None if v is None else v.astype(dtype)) for key, v in d.items()}, conv


def away_from_kink(dy, pre, margin=1e-3):
    """Zero the head gradient where the pre-activation is within margin of ReLU's kink, so
    that float rounding cannot flip the mask between two correct implementations."""
    dy = dy.copy()
    dy[np.abs(pre) < margin] = 0
    return dy
