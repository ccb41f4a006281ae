"""The numpy reference (fusedres.reference) is the yardstick for every kernel, so it is checked
here against two independent things:

1. finite differences in float64 (every gradient of conv1d_bn_relu in training, use_global_stats
   and inference mode, of the plain conv1d, and of add_relu), plus a naive loop conv1d;
2. MXNet 1.9.1's own stock ops under autograd (Convolution -> BatchNorm(fix_gamma=False) ->
   relu), in float64 and float32: output, all gradients and the running statistics after one
   training step. The 1-D route runs in one subprocess with MXNET_MKLDNN_ENABLED=0, because with
   MKLDNN on it crashes whenever channels % 8 == 0 (test_stock_conv1d_bn_backward_crashes shows
   that); the users' Conv2D (1, k) workaround and the MKLDNN 1-D route with 7 channels run
   in-process with MKLDNN on.

What MXNet does, as measured here (MXNet 1.9.1 CPU wheel, MKLDNN compiled in):
* running_var is updated with the *biased* batch variance (divided by N*W, not N*W-1), on the
  native path (MKLDNN off, any dtype, and float64 with MKLDNN on, which falls back to native) and
  on the MKLDNN path (float32, 3-D with 7 channels and 4-D Conv2D-workaround layout) alike; see
  test_mxnet_running_var_is_biased. The update happens in backward.
* BatchNormParam.momentum is a C++ *float*: momentum=0.9 is used as float32(0.9) =
  0.89999997615..., so after one step the running stats differ from the float64 formula with
  0.9 by 1e-8 to 1e-7 relative. The reference is therefore given
  MOMENTUM = float(np.float32(0.9)) when
  compared at float64 precision (a fused op should do the same to match MXNet bit-for-bit-ish).
  eps is a C++ double and needs no such care.
* autograd.record(train_mode=False) followed by y.backward() (whose train_mode defaults to True)
  makes BatchNorm's backward take the batch-statistics branch with the running statistics in
  place of the batch ones: the data/weight/bias gradients then match neither mode (gamma/beta
  do). The "infer" cases therefore call backward(train_mode=False), which matches the
  reference's is_train=False gradients exactly.
"""
import importlib.util
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import EPS, MOMENTUM, TOL, ConvCase

from fusedres import reference as R

HERE = Path(__file__).resolve().parent
STOCK_PATH = HERE / "mxnet_stock.py"

# The tolerances are helpers.TOL's "kernel" row (by dtype) and its "fd" row (the 5-point
# central difference in float64, h = FD_STEP). A comparison passes when
# max|actual - expected| <= tolerance * scale, scale being max|expected| unless a natural
# magnitude is given (see grad_scales).
KERNEL_TOL = TOL["kernel"]
FD_STEP = 1e-3
FD_MARGIN = 0.05      # |pre-activation| kept above this where dy != 0 in finite-difference cases
CMP_MARGIN = 1e-3     # the same in the comparisons with MXNet
GRADS = ("data", "weight", "bias", "gamma", "beta")


def load_stock():
    spec = importlib.util.spec_from_file_location("mxnet_stock", STOCK_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_close(actual, expected, tol, scale=None, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = float(np.abs(expected).max()) if expected.size else 0.0
    scale = max(scale, 1e-300)
    err = float(np.abs(actual - expected).max()) if expected.size else 0.0
    assert err <= tol * scale, (f"{what}: max abs err {err:.3g} > {tol:g} * scale {scale:.3g} "
                                f"(relative {err / scale:.3g})")


# ----------------------------------------------------------------------------------------------
# cases

def make_case(name, case, dtype="float64", mode="train", margin=CMP_MARGIN, layout="1d",
              zero_channel=False):
    """Random inputs of a ConvCase (drawn in float64, then rounded to dtype), seeded by name.

    dy is zeroed wherever |pre-activation| < margin (pre computed in float64 from the rounded
    inputs). The loss sum(dy * y) is then smooth around the inputs (finite differences), and a
    rounding-level disagreement about which side of ReLU's kink an element lies on cannot move
    any gradient (it moves y by < 1e-6 there, far inside the tolerances).

    zero_channel: gamma[0] = beta[0] = 0 (zero-initialised gamma is common in residual nets), so
    channel 0's pre-activation is exactly 0 in every dtype and on every path, and dy is kept
    there: it pins down that relu's gradient at exactly 0 is 0 (MXNet's convention)."""
    n, cin, width, cout, kernel, stride, pad, dilation, groups, bias = case
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    cin_g = cin // groups
    c = dict(
        name=name, stride=stride, pad=pad, dilation=dilation, groups=groups, eps=EPS,
        momentum=0.9, mode=mode, layout=layout,
        x=rng.standard_normal((n, cin, width)),
        w=rng.standard_normal((cout, cin_g, kernel)) / np.sqrt(cin_g * kernel),
        b=rng.standard_normal(cout) if bias else None,
        gamma=rng.uniform(0.5, 1.5, cout) * rng.choice([-1, 1], cout),
        beta=0.5 * rng.standard_normal(cout),
        rm=0.3 * rng.standard_normal(cout), rv=rng.uniform(0.5, 2.0, cout))
    if zero_channel:
        c["gamma"][0] = c["beta"][0] = 0
    for k in ("x", "w", "b", "gamma", "beta", "rm", "rv"):
        if c[k] is not None:
            c[k] = c[k].astype(dtype)
    lout = R.conv1d_out_width(width, kernel, stride, pad, dilation)
    _, cache, _, _ = reference_forward(c, np.float64)
    dy = rng.standard_normal((n, cout, lout))
    near_kink = np.abs(cache["pre"]) < margin
    if zero_channel:
        assert (cache["pre"][:, 0] == 0).all()
        near_kink[:, 0] = False
    dy[near_kink] = 0
    c["dy"] = dy.astype(dtype)
    c["dz"] = rng.standard_normal((n, cout, lout)).astype(dtype)
    return c


def as_dtype(c, dtype):
    return {k: (None if c.get(k) is None else np.asarray(c[k], dtype=dtype))
            for k in ("x", "w", "b", "gamma", "beta", "rm", "rv", "dy", "dz")}


def reference_forward(c, dtype, momentum=MOMENTUM):
    a = as_dtype(c, dtype)
    return R.conv1d_bn_relu_forward(
        a["x"], a["w"], a["b"], a["gamma"], a["beta"], a["rm"], a["rv"], stride=c["stride"],
        pad=c["pad"], dilate=c["dilation"], num_group=c["groups"], eps=c["eps"],
        momentum=momentum, is_train=c["mode"] != "infer", use_global_stats=c["mode"] == "global")


def reference_step(c, dtype):
    """Reference outputs named like mxnet_stock.step's, computed in dtype."""
    a = as_dtype(c, dtype)
    y, cache, rm, rv = reference_forward(c, dtype)
    out = dict(y=y, rm=rm, rv=rv)
    out.update(R.conv1d_bn_relu_backward(a["dy"], cache))
    if out["bias"] is None:
        del out["bias"]
    out["conv_z"] = R.conv1d(a["x"], a["w"], a["b"], c["stride"], c["pad"], c["dilation"],
                             c["groups"])
    out["conv_data"], out["conv_weight"] = R.conv1d_backward(
        a["dz"], a["x"], a["w"], c["stride"], c["pad"], c["dilation"], c["groups"])
    if a["b"] is not None:
        out["conv_bias"] = a["dz"].sum(axis=(0, 2))
    return out, cache


def grad_scales(c, cache):
    """The bias gradient of conv->BN is ~0 in training mode (BN removes the mean), so judge it
    against the magnitude of the terms it sums: max_c invstd_c |gamma_c| sum |dy masked|."""
    g = np.abs(np.where(cache["pre"] > 0, np.asarray(c["dy"], np.float64), 0)).sum(axis=(0, 2))
    return dict(bias=float((cache["invstd"] * np.abs(cache["gamma"]) * g).max()))


def compare_step(got, c, dtype, what):
    """got (MXNet's outputs, computed in dtype) against the float64 reference on the same
    inputs, with dtype's tolerance."""
    ref, cache = reference_step(c, np.float64)
    scales = grad_scales(c, cache)
    assert set(got) == set(ref), f"{what}: {sorted(got)} vs {sorted(ref)}"
    for k in ref:
        assert_close(got[k], ref[k], KERNEL_TOL[np.dtype(dtype)], scales.get(k), f"{what} {k}")


# name: ConvCase
STOCK_SHAPES = {
    "c7": ConvCase(4, 7, 97, 7, 3, 1, 1, 1, 1, True),
    "c64": ConvCase(4, 64, 97, 64, 3, 1, 1, 1, 1, True),
    "c64_stride2_nobias": ConvCase(3, 64, 97, 64, 3, 2, 1, 1, 1, False),
    "c64_dil2_groups2": ConvCase(3, 64, 97, 32, 5, 1, 4, 2, 2, True),
    "c6_odd_all": ConvCase(2, 6, 11, 10, 3, 2, 0, 2, 2, False),
}
STOCK_CASES = [(name, dt, mode) for name in STOCK_SHAPES for dt in ("float64", "float32")
               for mode in ("train", "global", "infer")
               if mode == "train" or name in ("c7", "c64_dil2_groups2")]


def stock_case(name, dtype, mode, layout="1d"):
    return make_case(f"{name}-{dtype}-{mode}", STOCK_SHAPES[name], dtype, mode, layout=layout,
                     zero_channel=True)


# ----------------------------------------------------------------------------------------------
# 1. finite differences (float64)

def fd_gradient(loss, arrays, name, h=FD_STEP):
    """5-point central difference of loss(arrays) w.r.t. every element of arrays[name]."""
    base = arrays[name]
    grad = np.zeros_like(base)
    for i in np.ndindex(base.shape):
        vals = []
        for step in (2, 1, -1, -2):
            pert = base.copy()
            pert[i] += step * h
            vals.append(loss(dict(arrays, **{name: pert})))
        grad[i] = (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * h)
    return grad


# name: ConvCase
FD_SHAPES = {
    "basic": ConvCase(2, 3, 9, 3, 3, 1, 1, 1, 1, True),
    "stride2": ConvCase(2, 3, 11, 4, 3, 2, 1, 1, 1, True),
    "dil2_nobias": ConvCase(2, 3, 11, 5, 3, 1, 2, 2, 1, False),
    "groups2": ConvCase(2, 4, 9, 6, 3, 1, 1, 1, 2, True),
    "c7_k2_nopad": ConvCase(2, 7, 11, 3, 2, 1, 0, 1, 1, True),
    "all": ConvCase(3, 6, 11, 4, 3, 2, 2, 2, 2, False),
}
FD_CASES = [(name, m) for name in FD_SHAPES for m in ("train", "global", "infer")
            if m == "train" or name in ("basic", "all")]


@pytest.mark.parametrize("name,mode", FD_CASES, ids=[f"{s}-{m}" for s, m in FD_CASES])
def test_conv1d_bn_relu_finite_differences(name, mode):
    c = make_case(f"fd-{name}-{mode}", FD_SHAPES[name], dtype="float64", mode=mode,
                  margin=FD_MARGIN)
    assert np.count_nonzero(c["dy"]) > 0.7 * c["dy"].size
    active = c["dy"] != 0
    _, cache, _, _ = reference_forward(c, np.float64)
    base_side = cache["pre"][active] > 0

    def loss(a):
        y, cch, _, _ = R.conv1d_bn_relu_forward(
            a["data"], a["weight"], a.get("bias"), a["gamma"], a["beta"], c["rm"], c["rv"],
            c["stride"], c["pad"], c["dilation"], c["groups"], c["eps"], MOMENTUM,
            is_train=mode != "infer", use_global_stats=mode == "global")
        # the perturbation must not move any element with dy != 0 across the kink
        assert np.array_equal(cch["pre"][active] > 0, base_side)
        return float((c["dy"] * y).sum())

    got = R.conv1d_bn_relu_backward(c["dy"], cache)
    arrays = {"data": c["x"], "weight": c["w"], "gamma": c["gamma"], "beta": c["beta"]}
    if c["b"] is not None:
        arrays["bias"] = c["b"]
    else:
        assert got["bias"] is None
    # a train-mode bias gradient is ~0: judge it against the size of the terms it sums
    scales = grad_scales(c, cache)
    for g in arrays:
        assert_close(got[g], fd_gradient(loss, arrays, g), TOL["fd"], scales.get(g),
                     f"{name}-{mode} d{g}")


def test_global_stats_equals_inference_mode():
    c = make_case("global-vs-infer", ConvCase(2, 4, 9, 6, 3, 1, 1, 1, 2, True), mode="global")
    yg, cg, rmg, rvg = reference_forward(c, np.float64)
    yi, ci, rmi, rvi = reference_forward(dict(c, mode="infer"), np.float64)
    np.testing.assert_array_equal(yg, yi)
    for a in (rmg, rmi):
        np.testing.assert_array_equal(a, c["rm"])
    for a in (rvg, rvi):
        np.testing.assert_array_equal(a, c["rv"])
    gg, gi = R.conv1d_bn_relu_backward(c["dy"], cg), R.conv1d_bn_relu_backward(c["dy"], ci)
    for k in GRADS:
        np.testing.assert_array_equal(gg[k], gi[k])


def test_running_stats_update_formula():
    """Training mode returns momentum * running + (1 - momentum) * batch, batch variance biased;
    the inputs are not modified."""
    c = make_case("running", ConvCase(3, 5, 13, 4, 3, 2, 1, 2, 1, True))
    rm0, rv0 = c["rm"].copy(), c["rv"].copy()
    _, _, rm, rv = reference_forward(c, np.float64, momentum=0.75)
    z = R.conv1d(c["x"], c["w"], c["b"], c["stride"], c["pad"], c["dilation"], c["groups"])
    tol = KERNEL_TOL[np.dtype(np.float64)]
    assert_close(rm, 0.75 * rm0 + 0.25 * z.mean(axis=(0, 2)), tol)
    assert_close(rv, 0.75 * rv0 + 0.25 * z.var(axis=(0, 2), ddof=0), tol)
    np.testing.assert_array_equal(c["rm"], rm0)
    np.testing.assert_array_equal(c["rv"], rv0)


def test_float32_reference_dtypes_and_accuracy():
    """The reference keeps float32 in float32 and agrees with its own float64 run."""
    c = stock_case("c64_dil2_groups2", "float32", "train")
    ref32, _ = reference_step(c, np.float32)
    ref64, cache = reference_step(c, np.float64)
    scales = grad_scales(c, cache)
    for k, v in ref32.items():
        assert v.dtype == np.float32, (k, v.dtype)
        assert_close(v, ref64[k], KERNEL_TOL[np.dtype(np.float32)], scales.get(k), f"float32 {k}")


def naive_conv1d(x, w, b, stride, pad, dilation, groups):
    n, cin, width = x.shape
    cout, cin_g, kernel = w.shape
    cout_g = cout // groups
    lout = (width + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    out = np.zeros((n, cout, lout))
    for o in range(cout):
        g = o // cout_g
        for l in range(lout):
            for ci in range(cin_g):
                for k in range(kernel):
                    pos = l * stride + k * dilation - pad
                    if 0 <= pos < width:
                        out[:, o, l] += x[:, g * cin_g + ci, pos] * w[o, ci, k]
            if b is not None:
                out[:, o, l] += b[o]
    return out


@pytest.mark.parametrize("name", FD_SHAPES)
def test_conv1d_naive_and_finite_differences(name):
    c = make_case(f"conv-{name}", FD_SHAPES[name])
    args = (c["stride"], c["pad"], c["dilation"], c["groups"])
    z = R.conv1d(c["x"], c["w"], c["b"], *args)
    assert_close(z, naive_conv1d(c["x"], c["w"], c["b"], *args), KERNEL_TOL[np.dtype(np.float64)])
    assert z.shape[2] == R.conv1d_out_width(c["x"].shape[2], c["w"].shape[2], c["stride"],
                                            c["pad"], c["dilation"])
    dz = c["dz"]
    dx, dw = R.conv1d_backward(dz, c["x"], c["w"], *args)

    def loss(a):
        return float((dz * R.conv1d(a["x"], a["w"], a.get("b"), *args)).sum())

    arrays = {"x": c["x"], "w": c["w"], "b": c["b"]}
    if c["b"] is None:
        del arrays["b"]
    else:
        assert_close(dz.sum(axis=(0, 2)), fd_gradient(loss, arrays, "b"), TOL["fd"])
    assert_close(dx, fd_gradient(loss, arrays, "x"), TOL["fd"], what="conv dx")
    assert_close(dw, fd_gradient(loss, arrays, "w"), TOL["fd"], what="conv dw")


def test_add_relu_finite_differences():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((2, 3, 7)), rng.standard_normal((2, 3, 7))
    dy = rng.standard_normal(a.shape)
    dy[np.abs(a + b) < FD_MARGIN] = 0
    y = R.add_relu_forward(a, b)
    np.testing.assert_array_equal(y, np.where(a + b > 0, a + b, 0))
    da, db = R.add_relu_backward(dy, y)

    def loss(arrs):
        return float((dy * R.add_relu_forward(arrs["a"], arrs["b"])).sum())

    arrays = {"a": a, "b": b}
    assert_close(da, fd_gradient(loss, arrays, "a"), TOL["fd"], what="add_relu da")
    assert_close(db, fd_gradient(loss, arrays, "b"), TOL["fd"], what="add_relu db")
    assert da is not db


# ----------------------------------------------------------------------------------------------
# 2. against stock MXNet

@pytest.fixture(scope="module")
def stock_results(tmp_path_factory):
    """Runs every STOCK_CASES case through mxnet_stock.py in one MKLDNN-off subprocess."""
    pytest.importorskip("mxnet")
    stock = load_stock()
    cases = [stock_case(*k) for k in STOCK_CASES]
    tmp = tmp_path_factory.mktemp("stock")
    stock.save_cases(tmp / "in.npz", cases)
    env = dict(os.environ, MXNET_MKLDNN_ENABLED="0", MXNET_STORAGE_FALLBACK_LOG_VERBOSE="0")
    proc = subprocess.run([sys.executable, str(STOCK_PATH), "batch", str(tmp / "in.npz"),
                           str(tmp / "out.npz")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(STOCK_CASES, stock.load_results(tmp / "out.npz")))


@pytest.mark.parametrize("key", STOCK_CASES, ids=["-".join(k) for k in STOCK_CASES])
def test_matches_stock_mxnet_conv1d(stock_results, key):
    """MKLDNN off (MXNet's native CPU ops), 1-D Convolution on (N, C, W)."""
    got = stock_results[key]
    c = stock_case(*key)
    for k, v in got.items():
        assert v.dtype == np.dtype(key[1]), (k, v.dtype)
    compare_step(got, c, key[1], "-".join(key))


@pytest.fixture(scope="module")
def mx_inproc():
    mx = pytest.importorskip("mxnet")
    return mx, load_stock()


INPROC_CASES = [("c64", "train"), ("c64", "global"), ("c64", "infer"),
                ("c64_stride2_nobias", "train"), ("c64_dil2_groups2", "train"),
                ("c6_odd_all", "train")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,mode", INPROC_CASES, ids=["-".join(k) for k in INPROC_CASES])
def test_matches_mxnet_conv2d_workaround(mx_inproc, name, mode, dtype):
    """In-process, MKLDNN as the build has it: the users' workaround, Convolution with kernel
    (1, k) on (N, C, 1, W) (float32 runs on MKLDNN; float64 falls back to native ops)."""
    mx, stock = mx_inproc
    c = stock_case(name, dtype, mode, layout="2d")
    compare_step(stock.step(mx, c), c, dtype, f"2d-{name}-{mode}-{dtype}")


@pytest.mark.parametrize("mode", ["train", "global", "infer"])
def test_matches_mxnet_conv1d_mkldnn_c7(mx_inproc, mode):
    """In-process 1-D route with 7 channels, which MKLDNN handles without crashing."""
    mx, stock = mx_inproc
    c = stock_case("c7", "float32", mode)
    compare_step(stock.step(mx, c), c, "float32", f"1d-mkldnn-c7-{mode}")


@pytest.mark.parametrize("layout,dtype", [("2d", "float32"), ("1d", "float64")])
def test_mxnet_running_var_is_biased(mx_inproc, layout, dtype):
    """Recover MXNet's batch variance from its running_var after one step and compare it with
    the biased and unbiased variance of the conv output. float32/2d runs on MKLDNN, float64/1d on
    the native BatchNorm (MKLDNN has no float64)."""
    mx, stock = mx_inproc
    c = stock_case("c64", dtype, "train", layout=layout)
    c["x"] = c["x"][:2, :, :9]          # N*W = 18: biased and unbiased differ by 6 %
    c["dy"], c["dz"] = c["dy"][:2, :, :9], c["dz"][:2, :, :9]
    got = stock.step(mx, c)
    z = R.conv1d(*(np.asarray(c[k], np.float64) for k in ("x", "w", "b")), c["stride"],
                 c["pad"], c["dilation"], c["groups"])
    batch_var = (got["rv"] - MOMENTUM * c["rv"]) / (1 - MOMENTUM)
    tol = KERNEL_TOL[np.dtype(dtype)] * 10     # the division by 1 - momentum amplifies rounding 10x
    assert_close(batch_var, z.var(axis=(0, 2), ddof=0), tol, what="biased")
    assert np.abs(batch_var / z.var(axis=(0, 2), ddof=1) - 1).min() > 0.03   # not unbiased
    if dtype == "float64":
        # and MXNet's momentum is float32(0.9), not 0.9: the float64 formula with 0.9 is off
        with_09 = 0.9 * c["rv"] + 0.1 * z.var(axis=(0, 2))
        assert np.abs(got["rv"] - with_09).max() > 1e-9
        assert_close(got["rv"], MOMENTUM * c["rv"] + (1 - MOMENTUM) * z.var(axis=(0, 2)),
                     KERNEL_TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_add_relu_matches_mxnet(mx_inproc, dtype):
    mx, _ = mx_inproc
    from mxnet import autograd
    rng = np.random.default_rng(11)
    a = rng.standard_normal((4, 64, 97)).astype(dtype)
    b = rng.standard_normal(a.shape).astype(dtype)
    b[0, 0, :10] = -a[0, 0, :10]        # exact zeros: both give gradient 0 there
    dy = rng.standard_normal(a.shape).astype(dtype)
    ma, mb = mx.nd.array(a, dtype=dtype), mx.nd.array(b, dtype=dtype)
    ma.attach_grad()
    mb.attach_grad()
    with autograd.record():
        my = mx.nd.relu(ma + mb)
    my.backward(mx.nd.array(dy, dtype=dtype))
    y = R.add_relu_forward(a, b)
    da, db = R.add_relu_backward(dy, y)
    assert y.dtype == da.dtype == db.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(my.asnumpy(), y)
    np.testing.assert_array_equal(ma.grad.asnumpy(), da)
    np.testing.assert_array_equal(mb.grad.asnumpy(), db)
    assert (da[0, 0, :10] == 0).all()


# ----------------------------------------------------------------------------------------------
# 3. the crash that motivates fusedres

def test_stock_conv1d_bn_backward_crashes():
    """Stock Gluon Conv1D(64) -> BatchNorm -> relu backward under MKLDNN fails with
    "Check failed: !is_view" (a 7-channel control in the same process works). If this starts
    passing, the upstream bug is gone from the installed MXNet: the failure says so."""
    pytest.importorskip("mxnet")
    env = dict(os.environ, MXNET_MKLDNN_ENABLED="1")
    proc = subprocess.run([sys.executable, str(STOCK_PATH), "crash"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "channels=7: backward ok" in proc.stdout, (
        f"the 7-channel control failed too (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    if proc.returncode == 0:
        pytest.fail("stock Conv1D->BatchNorm backward with 64 channels did NOT crash under "
                    f"MKLDNN; stdout:\n{proc.stdout}\nThe MKLDNN is_view bug did not reproduce "
                    "with this MXNet build (is MKLDNN compiled in? see the first stdout line).")
    assert "is_view" in proc.stderr, (
        f"it failed (rc {proc.returncode}) but not with the known is_view check:\n"
        f"{proc.stderr[-2000:]}")
