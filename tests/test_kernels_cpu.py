"""fusedres._C CPU kernels against the numpy reference (fusedres/reference).

float64 runs must match the float64 reference to ~1e-10 (relative to the largest value of
each output); float32 runs are compared against the float64 reference computed from the same
(float32) inputs, with errors scaled by magnitude (~1e-4). Every available instruction-set
path (FUSEDRES_CPU_ISA=generic|avx2|avx512) is exercised.

The extension is loaded straight from its file and the reference is MXNet-free, so these tests
need neither MXNet nor the rest of the package to import (conftest.py makes fusedres.reference
importable without MXNet).
"""
import glob
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import BAD_KERNEL_CALLS, TOL, ConvCase, assert_refused_as_the_spec_says

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _load_c():
    if "fusedres._C" in sys.modules:
        return sys.modules["fusedres._C"]
    # this interpreter's build only: a tree can hold _C for several Pythons (the wheel checks)
    so = [p for sfx in importlib.machinery.EXTENSION_SUFFIXES
          for p in sorted(glob.glob(str(ROOT / "fusedres" / ("_C" + sfx))))]
    if not so:
        pytest.skip("fusedres._C is not built (pip install -e .)", allow_module_level=True)
    return _load("fusedres._C", so[0])


_C = _load_c()
ref = ref_add = importlib.import_module("fusedres.reference")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
ISAS = ["default", "generic"]
if {"avx2", "fma"} <= _FLAGS:
    ISAS.append("avx2")
if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _FLAGS:
    ISAS.append("avx512")


@pytest.fixture
def isa(request, monkeypatch):
    name = request.param
    if name == "default":
        monkeypatch.delenv("FUSEDRES_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("FUSEDRES_CPU_ISA", name)
    return name


BIG = [
    ConvCase(2, 64, 1024, 64, 3, 1, 1, 1, 1, True),  # reference shape (batch cut for test time)
    ConvCase(1, 256, 512, 256, 5, 1, 2, 1, 1, True),
    ConvCase(2, 32, 4096, 32, 3, 2, 1, 1, 1, True),
    ConvCase(4, 128, 256, 128, 1, 1, 0, 1, 1, True),
    ConvCase(1, 64, 2500, 64, 9, 1, 4, 2, 1, True),
    ConvCase(2, 256, 2048, 256, 3, 1, 1, 1, 256, True),   # depthwise (the engine's own path)
]
SMALL = [
    ConvCase(2, 8, 16, 8, 3, 1, 1, 1, 1, True),           # tiny
    ConvCase(3, 8, 40, 12, 3, 1, 1, 1, 2, True),          # groups 2
    ConvCase(2, 6, 33, 9, 3, 1, 1, 1, 3, False),          # groups 3, no bias
    ConvCase(2, 7, 97, 7, 3, 1, 1, 1, 1, True),           # odd channels and length
    ConvCase(3, 7, 97, 5, 4, 2, 3, 2, 1, True),           # odd everything, stride 2 dilation 2
    ConvCase(2, 5, 50, 11, 3, 3, 2, 1, 1, False),         # stride 3
    ConvCase(2, 16, 64, 16, 1, 1, 0, 1, 1, False),        # kernel 1, pad 0
    ConvCase(2, 9, 31, 10, 5, 1, 0, 1, 1, True),          # pad 0
    ConvCase(2, 4, 10, 6, 3, 1, 5, 1, 1, True),           # pad larger than the kernel: zero edges
    ConvCase(2, 4, 12, 6, 3, 2, 6, 3, 1, True),           # pad > kernel, stride and dilation
    ConvCase(1, 24, 300, 40, 3, 1, 1, 1, 1, True),        # N = 1
    ConvCase(4, 6, 5, 6, 5, 1, 0, 1, 1, True),            # Lout = 1
    ConvCase(3, 3, 9, 4, 3, 4, 1, 1, 1, True),            # stride 4, short
    ConvCase(2, 20, 200, 36, 7, 1, 3, 3, 4, True),        # groups 4, dilation 3
    ConvCase(2, 33, 130, 70, 2, 1, 1, 1, 1, True),        # even kernel
    ConvCase(5, 3, 1, 2, 1, 1, 0, 1, 1, True),            # width 1
    ConvCase(2, 48, 70, 48, 3, 2, 0, 1, 2, True),         # groups 2 stride 2
    # depthwise (groups == input channels): csrc/cpu/engine/depthwise.h
    ConvCase(3, 8, 37, 8, 3, 1, 1, 1, 8, True),           # depthwise
    ConvCase(2, 6, 41, 12, 5, 2, 2, 1, 6, True),          # multiplier 2, stride 2
    ConvCase(2, 5, 60, 15, 3, 1, 0, 3, 5, False),         # multiplier 3, dilation 3, pad 0
    ConvCase(2, 4, 50, 32, 3, 3, 2, 1, 4, True),          # multiplier 8, stride == kernel
    ConvCase(2, 4, 50, 4, 3, 5, 1, 1, 4, True),           # stride > kernel (gathered windows)
    ConvCase(1, 3, 1000, 3, 9, 1, 4, 2, 3, True),         # long row, k9 dilation 2
    ConvCase(2, 7, 9, 7, 5, 2, 6, 2, 7, True),            # pad > kernel: zero edges, stride 2
    ConvCase(4, 5, 5, 5, 5, 1, 0, 1, 5, True),            # Lout = 1
    # width 2, kernel 2: Lout 1 (not width 1, kernel 1: batchnorm cancels a depthwise 1-tap
    # weight's scale, its exact gradient is 0 and only rounding residue is left to compare)
    ConvCase(3, 16, 2, 16, 2, 1, 0, 1, 16, False),
    ConvCase(2, 1, 33, 3, 3, 1, 1, 1, 1, True),           # one input channel, groups 1
    # few input channels per group: the weight gradient by row dots (backward.h)
    ConvCase(2, 1, 300, 16, 7, 2, 3, 1, 1, True),         # a stem: 1 channel in, 16 out
    ConvCase(2, 16, 50, 16, 3, 1, 1, 1, 2, True),         # 8 per group: the boundary
    ConvCase(2, 12, 45, 20, 3, 2, 2, 2, 4, False),        # 3 in, 5 out per group, s2 d2
    ConvCase(2, 4, 1100, 8, 5, 2, 2, 1, 4, True),         # depthwise, unmasked tiles over phases
    ConvCase(2, 3, 40, 30, 3, 1, 1, 1, 3, True),          # multiplier 10: the dense engine
    ConvCase(2, 16, 90, 20, 9, 2, 4, 1, 1, True),         # 16 in: row dots on AVX-512 float
    ConvCase(2, 13, 70, 11, 5, 1, 2, 2, 1, False),        # 13 in, dilation 2
    ConvCase(2, 34, 60, 18, 3, 1, 1, 1, 2, True),         # 17 in per group: the tiles
    ConvCase(40, 8, 20, 26, 9, 1, 4, 1, 2, True),         # many short rows summed per tile, 13 out
    ConvCase(3, 6, 29, 10, 4, 3, 7, 2, 2, False),         # pad past the taps, stride 3 dilation 2
    # gathered windows (stride > kernel): a 1x1 strided projection, padding past the row
    ConvCase(2, 6, 33, 10, 1, 2, 0, 1, 1, True),
    ConvCase(2, 5, 20, 7, 2, 5, 3, 2, 1, False),
    ConvCase(2, 7, 41, 9, 1, 3, 1, 1, 1, True),           # 1x1 stride 3, padded
    # depthwise, stride > kernel (gathered): 2 taps, as a depthwise 1-tap weight's exact
    # gradient under batch statistics is 0 (see above)
    ConvCase(2, 8, 45, 8, 2, 3, 0, 1, 8, True),
    # weights beyond L2 on short rows: the forward's row-blocked schedule (at 1 thread too)
    ConvCase(4, 256, 32, 250, 3, 1, 1, 1, 1, True),
    # the same schedule's inputs staged once per group for all of a thread's units: 2 groups of
    # 3 units (16, 16 and 8 positions: threads with 1 and 2 of them), and 1 unit (a thread
    # without any)
    ConvCase(1, 512, 40, 512, 3, 1, 1, 1, 2, True),
    ConvCase(1, 256, 14, 256, 5, 1, 2, 1, 1, False),
    # weight-gradient sums beyond L2 (conv_bwd_weight's row split): short rows summed over
    # runs of 5 and then 4 batch items, stride 2; and 4 groups, each split across the threads
    ConvCase(9, 150, 200, 200, 5, 2, 2, 1, 1, True),
    ConvCase(3, 512, 40, 512, 3, 1, 1, 1, 4, False),
    # rows 4 KiB apart (float32; 8 KiB in float64) alias in L1: the data gradient stages such dz
    # rows per unit (stage_taps), as the stride-1 forward does every input (zeros for padding):
    # pad past the kernel, dilation 3, a partial tail, one block of output rows and more than one
    # (8 rows to a block on AVX-512) ending in a partial block
    ConvCase(2, 8, 1024, 6, 3, 1, 5, 3, 1, True),
    ConvCase(2, 8, 1024, 10, 3, 1, 5, 3, 1, True),
    ConvCase(2, 10, 1030, 6, 7, 1, 0, 1, 1, False),       # dz rows (the data gradient's)
    ConvCase(2, 9, 2048, 12, 3, 2, 1, 1, 1, True),        # dz rows, stride 2 phases
    ConvCase(2, 20, 1024, 18, 3, 1, 1, 1, 2, True),       # both, groups 2
    # the backward in one pass per unit (backward_units: stride 1, pad <= (K - 1) * dilation,
    # more inputs per group than the row tiles take): 8 chunks of one item whose dz shares
    # start 24 positions before their dx chunks (pad 0, dilation 3); pad at its limit with
    # groups; two chunks per item, the last shorter
    ConvCase(1, 40, 1000, 24, 9, 1, 0, 3, 1, True),
    ConvCase(2, 48, 700, 20, 3, 1, 2, 1, 2, False),
    ConvCase(3, 24, 1500, 40, 5, 1, 2, 1, 1, True),
    # few units for the threads: chunks cut to a multiple of the vector width, not of the tile,
    # to balance the threads (make_chunks); forward, data gradient and one pass, stride 2
    ConvCase(1, 64, 250, 64, 3, 1, 1, 1, 1, True),
    ConvCase(3, 32, 100, 40, 3, 2, 1, 1, 1, True),
]


def _id(s):
    n, ci, l, co, k, st, p, d, g, b = s
    return f"n{n}c{ci}l{l}o{co}k{k}s{st}p{p}d{d}g{g}{'b' if b else 'nb'}"


def _make(shape, dtype, seed=0, mean_shift=0.0):
    n, ci, l, co, k, st, p, d, g, has_bias = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, ci, l)) + mean_shift
    w = rng.standard_normal((co, ci // g, k)) / np.sqrt(ci // g * k)
    bias = rng.standard_normal(co) * 0.5 if has_bias else None
    gamma = rng.uniform(0.5, 1.5, co) * rng.choice([-1.0, 1.0], co, p=[0.1, 0.9])
    beta = rng.standard_normal(co) * 0.3
    rm = rng.standard_normal(co) * 0.1
    rv = rng.uniform(0.5, 2.0, co)
    lout = ref.conv1d_out_width(l, k, st, p, d)
    dy = rng.standard_normal((n, co, lout))
    c = lambda a: None if a is None else np.ascontiguousarray(a, dtype=dtype)
    return dict(x=c(x), w=c(w), bias=c(bias), gamma=c(gamma), beta=c(beta), rm=c(rm), rv=c(rv),
                dy=c(dy), stride=st, pad=p, dil=d, groups=g, lout=lout)


def _f64(a):
    return None if a is None else a.astype(np.float64)


def _check(got, want, tol, what):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(got)), what
    scale = max(np.max(np.abs(want)) if want.size else 0.0, 1e-30)
    err = np.max(np.abs(got - want)) / scale if want.size else 0.0
    assert err <= tol, f"{what}: max error {err:.3e} (relative to {scale:.3e}) > {tol:.1e}"


def _tol(dtype):
    return TOL["kernel"][np.dtype(dtype)]


def _forward_train(d, dtype, batch_stats=True, eps=1e-5, momentum=0.9):
    n, co, lout = d["x"].shape[0], d["w"].shape[0], d["lout"]
    z = np.full((n, co, lout), np.nan, dtype)
    y = np.full((n, co, lout), np.nan, dtype)
    mean = np.full(co, np.nan, dtype)
    invstd = np.full(co, np.nan, dtype)
    rm, rv = d["rm"].copy(), d["rv"].copy()
    _C.conv1d_bn_relu_forward_train(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], rm, rv, z,
                                    mean, invstd, y, d["stride"], d["pad"], d["dil"], d["groups"],
                                    eps, momentum, batch_stats)
    return z, y, mean, invstd, rm, rv


def _ref_forward(d, is_train=True, use_global_stats=False, eps=1e-5, momentum=0.9):
    return ref.conv1d_bn_relu_forward(
        _f64(d["x"]), _f64(d["w"]), _f64(d["bias"]), _f64(d["gamma"]), _f64(d["beta"]),
        _f64(d["rm"]), _f64(d["rv"]), d["stride"], d["pad"], d["dil"], d["groups"], eps,
        momentum, is_train, use_global_stats)


ALL = BIG + SMALL


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", ALL, ids=_id)
def test_forward_train_batch_stats(shape, dtype):
    d = _make(shape, dtype)
    z, y, mean, invstd, rm, rv = _forward_train(d, dtype)
    ry, cache, rrm, rrv = _ref_forward(d)
    tol = _tol(dtype)
    rz = ref.conv1d(_f64(d["x"]), _f64(d["w"]), _f64(d["bias"]), d["stride"], d["pad"], d["dil"],
                    d["groups"])
    _check(z, rz, tol, "z")
    _check(mean, rz.mean(axis=(0, 2)), tol, "mean")
    _check(invstd, cache["invstd"], tol, "invstd")
    _check(rm, rrm, tol, "running_mean")
    _check(rv, rrv, tol, "running_var")
    _check(y, ry, tol * 4, "y")
    assert np.all(y >= 0)


@pytest.mark.parametrize("isa", ISAS[1:], indirect=True)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [ConvCase(4, 16, 300, 16, 3, 1, 1, 1, 1, True),
                                   ConvCase(8, 4, 4096, 4, 3, 1, 1, 1, 4, True)],
                         ids=["dense", "depthwise"])
def test_forward_stats_large_input_mean(shape, dtype, isa):
    """Inputs far from zero with positive weights: with padding the edge outputs are far from
    the channel's mean, the shape that breaks statistics taken about an edge value (found in
    review of the depthwise path: 2.2e-4 relative error in invstd on the portable code)."""
    d = _make(shape, dtype, seed=4)
    d["x"] = (d["x"] + 100.0).astype(dtype)
    d["w"] = np.abs(d["w"]).astype(dtype)
    z, y, mean, invstd, rm, rv = _forward_train(d, dtype)
    zz = z.astype(np.float64)
    _check(invstd, 1.0 / np.sqrt(zz.var(axis=(0, 2)) + 1e-5), _tol(dtype), "invstd")
    _check(mean, zz.mean(axis=(0, 2)), _tol(dtype), "mean")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_stats_large_mean(dtype):
    """The variance must not lose precision when the mean is large against the spread."""
    shape = (4, 16, 300, 16, 3, 1, 1, 1, 1, True)
    d = _make(shape, dtype, seed=3, mean_shift=0.0)
    d["bias"] = (d["bias"] + 300.0).astype(dtype)
    z, y, mean, invstd, rm, rv = _forward_train(d, dtype)
    ry, cache, rrm, rrv = _ref_forward(d)
    zz = z.astype(np.float64)
    # variance of what the kernel produced, computed exactly
    _check(invstd, 1.0 / np.sqrt(zz.var(axis=(0, 2)) + 1e-5), _tol(dtype) * 10, "invstd")
    _check(mean, zz.mean(axis=(0, 2)), _tol(dtype), "mean")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", ALL, ids=_id)
def test_forward_global_stats(shape, dtype):
    d = _make(shape, dtype, seed=2)
    z, y, mean, invstd, rm, rv = _forward_train(d, dtype, batch_stats=False)
    ry, cache, _, _ = _ref_forward(d, is_train=True, use_global_stats=True)
    tol = _tol(dtype)
    assert np.array_equal(rm, d["rm"]) and np.array_equal(rv, d["rv"])
    _check(mean, d["rm"], 0, "mean")
    _check(invstd, cache["invstd"], tol, "invstd")
    _check(y, ry, tol * 4, "y")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", ALL, ids=_id)
def test_forward_infer(shape, dtype):
    d = _make(shape, dtype, seed=4)
    n, co, lout = d["x"].shape[0], d["w"].shape[0], d["lout"]
    y = np.full((n, co, lout), np.nan, dtype)
    _C.conv1d_bn_relu_forward_infer(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"],
                                    d["rv"], y, d["stride"], d["pad"], d["dil"], d["groups"], 1e-5)
    ry, _, _, _ = _ref_forward(d, is_train=False)
    _check(y, ry, _tol(dtype) * 4, "y")


# Depthwise 1x1 with stride (gathered windows, then the depthwise path): a 1-tap depthwise
# weight's gradient under batch statistics is 0 exactly (the batchnorm cancels its scale), so
# the backward is compared with running statistics, where it is not.
DW_1X1_STRIDED = [ConvCase(2, 8, 45, 8, 1, 2, 0, 1, 8, True),
                  ConvCase(3, 6, 70, 12, 1, 3, 1, 1, 6, False)]


@pytest.mark.parametrize("isa", ISAS[1:], indirect=True)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", DW_1X1_STRIDED, ids=_id)
def test_depthwise_1x1_strided(shape, dtype, isa):
    d = _make(shape, dtype, seed=11)
    tol = _tol(dtype)
    n, co, lout = d["x"].shape[0], d["w"].shape[0], d["lout"]
    yi = np.full((n, co, lout), np.nan, dtype)
    _C.conv1d_bn_relu_forward_infer(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"],
                                    d["rv"], yi, d["stride"], d["pad"], d["dil"], d["groups"], 1e-5)
    _check(yi, _ref_forward(d, is_train=False)[0], tol * 4, "inference y")
    _, y, _, _, _, _ = _forward_train(d, dtype)
    _check(y, _ref_forward(d)[0], tol * 4, "training y")
    want = ("data", "weight", "bias", "gamma", "beta")
    z, y, mean, invstd, _, _ = _forward_train(d, dtype, batch_stats=False)
    grads = _backward(d, dtype, z, mean, invstd, False, want)
    _check_grads(grads, _ref_backward_from(d, z, y, mean, invstd, False), dtype, want)


def _ref_backward_from(d, z, y, mean, invstd, batch_stats):
    """float64 backward from the kernel's own saved z/mean/invstd and the forward's relu mask
    (y > 0), so a float32 rounding near the relu kink cannot make the comparison flaky."""
    z64, mean64, invstd64 = _f64(z), _f64(mean), _f64(invstd)
    xhat = (z64 - mean64[None, :, None]) * invstd64[None, :, None]
    cache = dict(x=_f64(d["x"]), w=_f64(d["w"]), has_bias=d["bias"] is not None,
                 gamma=_f64(d["gamma"]), xhat=xhat, invstd=invstd64,
                 pre=np.where(y > 0, 1.0, -1.0), relu=True, batch_stats=batch_stats,
                 stride=d["stride"],
                 pad=d["pad"], dilate=d["dil"], num_group=d["groups"])
    return ref.conv1d_bn_relu_backward(_f64(d["dy"]), cache)


def _backward(d, dtype, z, mean, invstd, batch_stats, want=("data", "weight", "bias", "gamma",
                                                             "beta")):
    x, w = d["x"], d["w"]
    co = w.shape[0]
    grads = dict(
        data=np.full(x.shape, np.nan, dtype) if "data" in want else None,
        weight=np.full(w.shape, np.nan, dtype) if "weight" in want else None,
        bias=np.full(co, np.nan, dtype) if "bias" in want else None,
        gamma=np.full(co, np.nan, dtype) if "gamma" in want else None,
        beta=np.full(co, np.nan, dtype) if "beta" in want else None)
    _C.conv1d_bn_relu_backward(d["dy"], x, w, z, d["gamma"], d["beta"], mean, invstd,
                               grads["data"], grads["weight"], grads["bias"], grads["gamma"],
                               grads["beta"], d["stride"], d["pad"], d["dil"], d["groups"],
                               batch_stats)
    return grads


def _check_grads(grads, rg, dtype, want):
    tol = _tol(dtype) * (1 if dtype == np.float64 else 5)
    for k in want:
        if k == "bias":
            if rg["bias"] is None:
                continue
            # with batch statistics sum(dz) is ~0: scale by the magnitude of its terms
            got, exp = grads["bias"], rg["bias"]
            scale = max(np.max(np.abs(rg["beta"])), np.max(np.abs(exp)), 1e-30)
            assert np.max(np.abs(_f64(got) - exp)) / scale <= tol, "bias"
        else:
            _check(grads[k], rg[k], tol, k)


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", ALL, ids=_id)
def test_backward(shape, dtype, batch_stats):
    d = _make(shape, dtype, seed=5)
    z, y, mean, invstd, _, _ = _forward_train(d, dtype, batch_stats=batch_stats)
    want = ("data", "weight", "bias", "gamma", "beta")
    grads = _backward(d, dtype, z, mean, invstd, batch_stats, want)
    if dtype == np.float64:
        # end to end against the reference (its own forward, its own mask)
        _, cache, _, _ = _ref_forward(d, is_train=True, use_global_stats=not batch_stats)
        rg = ref.conv1d_bn_relu_backward(_f64(d["dy"]), cache)
    else:
        rg = _ref_backward_from(d, z, y, mean, invstd, batch_stats)
    _check_grads(grads, rg, dtype, want)


@pytest.mark.parametrize("want", [("data",), ("weight",), ("bias",), ("gamma", "beta"),
                                  ("weight", "bias"), ("data", "gamma"), ()])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [SMALL[0], SMALL[4], BIG[0]], ids=_id)
def test_backward_some_grads(shape, dtype, want):
    d = _make(shape, dtype, seed=6)
    z, y, mean, invstd, _, _ = _forward_train(d, dtype)
    grads = _backward(d, dtype, z, mean, invstd, True, want)
    rg = _ref_backward_from(d, z, y, mean, invstd, True)
    _check_grads(grads, rg, dtype, want)
    for k in ("data", "weight", "bias", "gamma", "beta"):
        if k not in want:
            assert grads[k] is None


@pytest.mark.parametrize("isa", ISAS[1:], indirect=True)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SMALL + [BIG[0], BIG[2]], ids=_id)
def test_every_isa(shape, dtype, isa):
    """Each instruction-set path on its own: forward train, infer and backward."""
    d = _make(shape, dtype, seed=7)
    tol = _tol(dtype)
    z, y, mean, invstd, rm, rv = _forward_train(d, dtype)
    ry, cache, rrm, rrv = _ref_forward(d)
    _check(y, ry, tol * 4, "y")
    _check(rv, rrv, tol, "running_var")
    n, co, lout = d["x"].shape[0], d["w"].shape[0], d["lout"]
    yi = np.full((n, co, lout), np.nan, dtype)
    _C.conv1d_bn_relu_forward_infer(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"],
                                    d["rv"], yi, d["stride"], d["pad"], d["dil"], d["groups"], 1e-5)
    ryi, _, _, _ = _ref_forward(d, is_train=False)
    _check(yi, ryi, tol * 4, "y infer")
    want = ("data", "weight", "bias", "gamma", "beta")
    grads = _backward(d, dtype, z, mean, invstd, True, want)
    _check_grads(grads, _ref_backward_from(d, z, y, mean, invstd, True), dtype, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deterministic(dtype):
    d = _make(BIG[0], dtype, seed=8)
    outs = []
    for _ in range(2):
        z, y, mean, invstd, rm, rv = _forward_train(d, dtype)
        g = _backward(d, dtype, z, mean, invstd, True)
        outs.append([z, y, mean, invstd, rm, rv] + [g[k] for k in sorted(g)])
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_mask_matches_forward(dtype):
    """Backward's relu mask is exactly the forward's (y > 0): with dy = 1, gamma = 1 and
    global statistics, dgamma-free gradients are checked via beta_grad = count(y > 0)."""
    d = _make(SMALL[3], dtype, seed=9)
    d["dy"] = np.ones_like(d["dy"])
    z, y, mean, invstd, _, _ = _forward_train(d, dtype, batch_stats=False)
    g = _backward(d, dtype, z, mean, invstd, False, ("beta",))
    assert np.array_equal(g["beta"], (y > 0).sum(axis=(0, 2)).astype(dtype))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 31, 33, 1025, 100003])
def test_add_relu(n, dtype, isa):
    rng = np.random.default_rng(n)
    a = rng.standard_normal(n).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    y = np.full(n, np.nan, dtype)
    _C.add_relu_forward(a, b, y)
    assert np.array_equal(y, ref_add.add_relu_forward(a, b))
    dy = rng.standard_normal(n).astype(dtype)
    ga, gb = np.full(n, np.nan, dtype), np.full(n, np.nan, dtype)
    _C.add_relu_backward(dy, y, ga, gb)
    ra, rb = ref_add.add_relu_backward(dy, y)
    assert np.array_equal(ga, ra) and np.array_equal(gb, rb)
    for first, second in ((ga, None), (None, gb)):
        for arr in (ga, gb):
            arr.fill(np.nan)
        _C.add_relu_backward(dy, y, first, second)
        assert np.array_equal(first if first is not None else second, ra)
    _C.add_relu_backward(dy, y, None, None)


def test_add_relu_3d():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5, 7)).astype(np.float32)
    b = rng.standard_normal((3, 5, 7)).astype(np.float32)
    y = np.empty_like(a)
    _C.add_relu_forward(a, b, y)
    assert np.array_equal(y, np.maximum(a + b, 0))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [SMALL[1], SMALL[3], SMALL[4], SMALL[8], BIG[0]], ids=_id)
def test_without_relu(shape, dtype, isa):
    """relu=False (ConvBN1D): conv + batchnorm alone, forward, inference and backward, on every
    instruction set."""
    d = _make(shape, dtype, seed=5)
    n, co, lout = d["x"].shape[0], d["w"].shape[0], d["lout"]
    conv = (d["stride"], d["pad"], d["dil"], d["groups"])
    f64 = {k: _f64(d[k]) for k in ("x", "w", "bias", "gamma", "beta", "rm", "rv")}
    want, cache, rm_ref, rv_ref = ref.conv1d_bn_relu_forward(
        f64["x"], f64["w"], f64["bias"], f64["gamma"], f64["beta"], f64["rm"], f64["rv"], *conv,
        1e-5, 0.9, relu=False)
    assert (want < 0).any()
    z, y = np.full((n, co, lout), np.nan, dtype), np.full((n, co, lout), np.nan, dtype)
    mean, invstd = np.full(co, np.nan, dtype), np.full(co, np.nan, dtype)
    rm, rv = d["rm"].copy(), d["rv"].copy()
    _C.conv1d_bn_relu_forward_train(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], rm, rv, z,
                                    mean, invstd, y, *conv, 1e-5, 0.9, True, relu=False)
    _check(y, want, _tol(dtype), "forward without relu")
    _check(rv, rv_ref, _tol(dtype), "running_var")
    grads = {k: np.full(d[v].shape, np.nan, dtype) for k, v in
             (("data", "x"), ("weight", "w"), ("gamma", "gamma"), ("beta", "beta"))}
    grads["bias"] = None if d["bias"] is None else np.full(co, np.nan, dtype)
    _C.conv1d_bn_relu_backward(d["dy"], d["x"], d["w"], z, d["gamma"], d["beta"], mean, invstd,
                               grads["data"], grads["weight"], grads["bias"], grads["gamma"],
                               grads["beta"], *conv, True, relu=False)
    rg = ref.conv1d_bn_relu_backward(_f64(d["dy"]), cache)
    for k, g in grads.items():
        if k == "bias" and g is not None:
            # Analytically 0 with batch statistics: judge it against the size of its terms.
            terms = np.abs(_f64(d["dy"])).sum(axis=(0, 2)).max() * np.abs(_f64(d["gamma"])).max()
            assert np.max(np.abs(_f64(g) - rg[k])) <= 10 * _tol(dtype) * terms
        elif g is not None:
            _check(g, rg[k], _tol(dtype), f"{k} without relu")
    y_inf = np.full((n, co, lout), np.nan, dtype)
    _C.conv1d_bn_relu_forward_infer(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"],
                                    d["rv"], y_inf, *conv, 1e-5, relu=False)
    want_inf = ref.conv1d_bn_relu_forward(
        f64["x"], f64["w"], f64["bias"], f64["gamma"], f64["beta"], f64["rm"], f64["rv"], *conv,
        1e-5, 0.9, is_train=False, relu=False)[0]
    _check(y_inf, want_inf, _tol(dtype), "inference without relu")


def test_kernels_use_every_processor_unless_omp_num_threads_says_otherwise():
    """MXNet sets its worker threads' OpenMP default to half the processors when
    OMP_NUM_THREADS is unset; the kernels pick their own team size (threads.h)."""
    import os
    import subprocess
    code = "import mxnet, fusedres._C as c; print(c.kernel_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert int(out) == os.cpu_count()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(env, OMP_NUM_THREADS="3"), check=True).stdout
    assert int(out) == 3


@pytest.mark.parametrize("threads", ["1", "3", "5"])
def test_small_batches_at_other_thread_counts(threads):
    """Small batches are cut into units by the thread count (make_chunks, conv_tiles.h): the
    forward, inference and backward checks of the batch-1 and batch-3 cases, at other team
    sizes (this file in a process of its own)."""
    import os
    import subprocess
    sel = ("(test_forward_train_batch_stats or test_forward_infer or test_backward) "
           "and not some_grads and (n1c or n3c)")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", sel], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=threads), cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    passed = int(r.stdout.strip().splitlines()[-1].split()[0])
    assert passed >= 100, r.stdout[-500:]


@pytest.mark.parametrize("data, weight, stride, pad, dilate, num_group, eps", BAD_KERNEL_CALLS)
def test_bad_calls_get_the_spec_message(data, weight, stride, pad, dilate, num_group, eps):
    """csrc/conv_attrs.h's check_kernel_call says what fusedres.attrs.ConvAttrs.for_kernel says,
    word for word, in each of the three kernels."""
    assert_refused_as_the_spec_says(_C, lambda shape: np.zeros(shape, np.float32), data,
                                    weight, stride, pad, dilate, num_group, eps)


def test_fma_peak_probe_measures_each_instruction_set_and_refuses_bad_arguments():
    """The compute ceiling the benchmarks report against (csrc/cpu/peak.cpp): a positive rate
    for every instruction set the CPU has, refused by name for one it lacks or does not exist."""
    order = ["generic", "avx2", "avx512"]
    best = _C.cpu_isa()
    assert best in order
    for isa in order[:order.index(best) + 1]:
        rate = _C.fma_peak_gflops(isa, seconds=0.05)
        assert np.isfinite(rate) and rate > 0, (isa, rate)
    for isa in order[order.index(best) + 1:]:
        with pytest.raises(ValueError, match=f"isa '{isa}' is not supported by this CPU"):
            _C.fma_peak_gflops(isa)
    with pytest.raises(ValueError, match="isa must be 'generic', 'avx2' or 'avx512', got 'sse'"):
        _C.fma_peak_gflops("sse")
    for seconds in (0.0, -1.0, float("nan"), 100.0):
        with pytest.raises(ValueError, match="seconds must be in"):
            _C.fma_peak_gflops(None, seconds=seconds)


@pytest.mark.parametrize("isa", ISAS[1:], indirect=True)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_depthwise_infinite_first_output_gives_the_references_statistics(dtype, isa):
    """+inf in every channel's first conv output (the row its statistics are shifted by): the
    mean and running mean are +inf as in the reference, not NaN from inf - inf."""
    d = _make(ConvCase(3, 4, 40, 8, 3, 1, 1, 1, 4, True), dtype, seed=10)
    d["w"] = np.abs(d["w"]).astype(dtype)
    d["x"][0, :, 0] = np.inf
    z, y, mean, invstd, rm, rv = _forward_train(d, dtype)
    with np.errstate(invalid="ignore"):  # the reference's variance of an infinite row: NaN
        ry, cache, rrm, rrv = _ref_forward(d)
    assert np.all(np.isposinf(z[0, :, 0]))
    assert np.all(np.isposinf(mean)) and np.all(np.isposinf(rrm)), (mean, rrm)
    np.testing.assert_array_equal(np.isposinf(rm), np.isposinf(rrm))


def _infer(d, dtype, eps=1e-5):
    n, co = d["x"].shape[0], d["w"].shape[0]
    y = np.full((n, co, d["lout"]), np.nan, dtype)
    _C.conv1d_bn_relu_forward_infer(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"],
                                    d["rv"], y, d["stride"], d["pad"], d["dil"], d["groups"], eps)
    return y


PACK_CACHED = [ConvCase(2, 64, 40, 96, 3, 1, 1, 1, 1, True),   # dense: cached
               ConvCase(2, 7, 97, 5, 4, 2, 3, 2, 1, True),     # odd everything
               ConvCase(2, 4, 50, 6, 3, 5, 1, 1, 2, True)]     # gathered windows


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", PACK_CACHED, ids=_id)
def test_inference_reuses_packed_weights_only_while_every_input_is_unchanged(shape, dtype):
    """The inference forward keeps its packed, BN-folded weights between calls (csrc/cpu/
    pack_cache.h), keyed by the weight's address. Each input changed in place, at the same
    address, must give the new result, as must eps and the instruction set."""
    _C.pack_cache_clear()
    d = _make(shape, dtype, seed=11)
    first = _infer(d, dtype)
    again = _infer(d, dtype)        # second sighting: stored
    assert _C.pack_cache_stats()[0] == 1
    np.testing.assert_array_equal(_infer(d, dtype), first)   # from the cache, bit for bit
    np.testing.assert_array_equal(again, first)
    rng = np.random.default_rng(3)
    for name in ("w", "bias", "gamma", "beta", "rm", "rv"):
        arr = d[name]
        flat = arr.reshape(-1)
        i = rng.integers(flat.size)
        flat[i] = flat[i] * 1.5 + 0.25 if name != "rv" else flat[i] * 2.0   # one element
        _check(_infer(d, dtype), _ref_forward(d, is_train=False)[0], _tol(dtype) * 4,
               f"y after {name} changed in place")
        _check(_infer(d, dtype), _ref_forward(d, is_train=False)[0], _tol(dtype) * 4,
               f"y after {name} changed in place (cached again)")
    _check(_infer(d, dtype, eps=0.5), _ref_forward(d, is_train=False, eps=0.5)[0],
           _tol(dtype) * 4, "y with another eps")
    before = _infer(d, dtype)
    for other in ISAS[1:]:   # another instruction set packs for its own tile height
        import os
        old = os.environ.get("FUSEDRES_CPU_ISA")
        os.environ["FUSEDRES_CPU_ISA"] = other
        try:
            _check(_infer(d, dtype), _ref_forward(d, is_train=False)[0], _tol(dtype) * 4,
                   f"y on {other} after another instruction set's call")
        finally:
            if old is None:
                del os.environ["FUSEDRES_CPU_ISA"]
            else:
                os.environ["FUSEDRES_CPU_ISA"] = old
    np.testing.assert_array_equal(_infer(d, dtype), before)
    # A different weight array at another address: its own entry, its own result.
    d2 = dict(d, w=np.ascontiguousarray(d["w"][::-1]))
    _check(_infer(d2, dtype), _ref_forward(d2, is_train=False)[0], _tol(dtype) * 4, "y, w2")
    _C.pack_cache_clear()
    assert _C.pack_cache_stats() == (0, 0)


def test_pack_cache_can_be_turned_off_and_never_holds_a_non_finite_fold():
    import subprocess
    code = ("import glob, importlib.util, numpy as np\n"
            f"so = {_C.__file__!r}\n"
            "spec = importlib.util.spec_from_file_location('fusedres._C', so)\n"
            "C = importlib.util.module_from_spec(spec); spec.loader.exec_module(C)\n"
            "x = np.ones((1, 8, 20), np.float32); w = np.ones((8, 8, 3), np.float32)\n"
            "g, b, m, v = (np.ones(8, np.float32) for _ in range(4))\n"
            "y = np.empty((1, 8, 20), np.float32)\n"
            "for _ in range(3):\n"
            "    C.conv1d_bn_relu_forward_infer(x, w, None, g, b, m, v, y, 1, 1, 1, 1, 1e-5)\n"
            "print(C.pack_cache_stats()[0])\n"
            "g[0] = np.inf\n"
            "C.pack_cache_clear()\n"
            "for _ in range(3):\n"
            "    C.conv1d_bn_relu_forward_infer(x, w, None, g, b, m, v, y, 1, 1, 1, 1, 1e-5)\n"
            "print(C.pack_cache_stats()[0])\n")
    import os
    import sys as _sys
    run = lambda env: subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True,
                                     env={**os.environ, **env}, check=True).stdout.split()
    assert run({"FUSEDRES_PACK_CACHE_MB": "0"}) == ["0", "0"]
    assert run({}) == ["1", "0"]   # cached; an infinite gamma folds nothing and stores nothing
