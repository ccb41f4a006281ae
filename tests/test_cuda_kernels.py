"""CUDA kernels (fusedres.cuda on CuPy arrays) against the numpy reference.

Needs no MXNet. With a GPU, CuPy runs them; without one, the CPU emulation of CUDA in
tests/cuda_emu, in two schedules (conftest.py's cuda_target). References run in float64 on the
very values the kernel saw (float16 inputs are rounded first), so the tolerance only has to
cover the kernel's own error.
"""
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import (BAD_KERNEL_CALLS, EPS, TOL, ConvCase, assert_refused_as_the_spec_says,
                     cuda_targets)

from fusedres import cuda, reference
from fusedres.cuda import conv1d_bn_relu as cuda_conv
from fusedres.cuda import loader

cp = None  # CuPy or the emulation's stand-in, set per target by _target


@pytest.fixture(autouse=True, scope="module")
def _target(cuda_target):
    global cp
    cp = cuda_target[1]


# name: ConvCase (N, Cin, L, Cout, K, stride, pad, dilate, num_group, bias)
CASES = {
    "c7": ConvCase(2, 7, 97, 7, 3, 1, 1, 1, 1, True),
    "c64": ConvCase(2, 64, 97, 64, 3, 1, 1, 1, 1, True),
    "stride2": ConvCase(3, 8, 97, 6, 5, 2, 2, 1, 1, True),
    "dilation2_nobias": ConvCase(2, 8, 97, 8, 3, 1, 2, 2, 1, False),
    "groups2": ConvCase(2, 8, 97, 6, 3, 1, 1, 1, 2, True),
    "all_nopad": ConvCase(2, 64, 97, 64, 3, 2, 0, 2, 2, False),
    "tiles": ConvCase(2, 72, 97, 130, 3, 1, 1, 1, 1, True),  # several row tiles and k slices
    "long": ConvCase(2, 8, 2500, 8, 3, 1, 1, 1, 1, True),  # reductions and weight gradient split
}
# (data dtype, per-channel dtype)
DTYPES = {"f32": (np.float32, np.float32), "f16": (np.float16, np.float16),
          "f16_p32": (np.float16, np.float32)}
MOMENTUM = 0.9  # as a kernel call takes it (a double); the ops round it to a float first


def assert_close(got, ref, dtype, name):
    """got: a device array (or host values) within the dtype's tolerance of the reference."""
    got = cp.asnumpy(got).astype(np.float64)
    ref = np.asarray(ref, np.float64)
    atol, rtol = TOL["cuda"][np.dtype(dtype)]
    err = np.abs(got - ref).max()
    bound = atol + rtol * np.abs(ref).max()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def make_inputs(case, dtypes, seed=0):
    """Inputs of a case of CASES (a name) or of a ConvCase."""
    n, cin, width, cout, k, stride, pad, dil, groups, has_bias = CASES.get(case, case)
    dt, pt = DTYPES[dtypes]
    rng = np.random.default_rng(seed)
    host = dict(
        x=rng.standard_normal((n, cin, width)).astype(dt),
        w=(rng.standard_normal((cout, cin // groups, k)) / np.sqrt(cin // groups * k)).astype(dt),
        bias=rng.standard_normal(cout).astype(dt) if has_bias else None,
        gamma=rng.uniform(0.5, 1.5, cout).astype(pt),
        beta=(0.5 * rng.standard_normal(cout)).astype(pt),
        rm=(0.2 * rng.standard_normal(cout)).astype(pt),
        rv=rng.uniform(0.5, 2.0, cout).astype(pt),
    )
    conv = dict(stride=stride, pad=pad, dilate=dil, num_group=groups)
    return host, conv, dt, pt


def f64(a):
    return None if a is None else np.asarray(a, np.float64)


def dev(a):
    return None if a is None else cp.asarray(a)


def run_forward_train(host, conv, dt, pt, batch_stats, relu=True):
    lout = reference.conv1d_out_width(host["x"].shape[2], host["w"].shape[2], conv["stride"],
                                      conv["pad"], conv["dilate"])
    shape = (host["x"].shape[0], host["w"].shape[0], lout)
    d = {k: dev(v) for k, v in host.items()}
    cout = host["w"].shape[0]
    d.update(z=cp.empty(shape, dt), y=cp.empty(shape, dt), mean=cp.empty(cout, pt),
             invstd=cp.empty(cout, pt))
    cuda.conv1d_bn_relu_forward_train(
        d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"], d["rv"], d["z"], d["mean"],
        d["invstd"], d["y"], conv["stride"], conv["pad"], conv["dilate"], conv["num_group"], EPS,
        MOMENTUM, batch_stats, relu=relu)
    return d


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_forward_train(case, dtypes, batch_stats, relu):
    check_forward_train(case, dtypes, batch_stats, relu)


def check_forward_train(case, dtypes, batch_stats, relu):
    """test_forward_train's checks; returns (inputs, conv, the kernels' outputs)."""
    host, conv, dt, pt = make_inputs(case, dtypes)
    d = run_forward_train(host, conv, dt, pt, batch_stats, relu)
    y, cache, rm, rv = reference.conv1d_bn_relu_forward(
        f64(host["x"]), f64(host["w"]), f64(host["bias"]), f64(host["gamma"]), f64(host["beta"]),
        f64(host["rm"]), f64(host["rv"]), eps=EPS, momentum=MOMENTUM, is_train=True,
        use_global_stats=not batch_stats, relu=relu, **conv)
    z = reference.conv1d(f64(host["x"]), f64(host["w"]), f64(host["bias"]), **conv)
    assert_close(d["z"], z, dt, "z")
    assert_close(d["y"], y, dt, "out")
    if batch_stats:
        assert_close(d["mean"], z.mean(axis=(0, 2)), dt, "mean")
        assert_close(d["invstd"], 1 / np.sqrt(z.var(axis=(0, 2)) + EPS), dt, "invstd")
    else:
        assert_close(d["mean"], f64(host["rm"]), dt, "mean")
        assert_close(d["invstd"], 1 / np.sqrt(f64(host["rv"]) + EPS), dt, "invstd")
    assert_close(d["rm"], rm, dt, "running_mean")
    assert_close(d["rv"], rv, dt, "running_var")
    return host, conv, d


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("relu", [True, False])
def test_forward_infer(case, dtypes, relu):
    check_forward_infer(case, dtypes, relu)


def check_forward_infer(case, dtypes, relu):
    """test_forward_infer's checks; returns the kernel's output."""
    host, conv, dt, pt = make_inputs(case, dtypes)
    y_ref = reference.conv1d_bn_relu_forward(
        f64(host["x"]), f64(host["w"]), f64(host["bias"]), f64(host["gamma"]), f64(host["beta"]),
        f64(host["rm"]), f64(host["rv"]), eps=EPS, is_train=False, relu=relu, **conv)[0]
    d = {k: dev(v) for k, v in host.items()}
    y = cp.empty(y_ref.shape, dt)
    cuda.conv1d_bn_relu_forward_infer(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"],
                                      d["rv"], y, conv["stride"], conv["pad"], conv["dilate"],
                                      conv["num_group"], EPS, relu=relu)
    assert_close(y, y_ref, dt, "out")
    return y


def reference_backward(host, conv, d, dy, batch_stats, relu=True):
    """The float64 reference gradients for what run_forward_train saved in d."""
    with np.errstate(invalid="ignore", over="ignore"):
        _, cache, _, _ = reference.conv1d_bn_relu_forward(
            f64(host["x"]), f64(host["w"]), f64(host["bias"]), f64(host["gamma"]),
            f64(host["beta"]), f64(host["rm"]), f64(host["rv"]), eps=EPS, momentum=MOMENTUM,
            is_train=True, use_global_stats=not batch_stats, relu=relu, **conv)
        # The relu mask is the one the kernel recomputes from what forward saved; deriving it
        # from the float64 forward instead would flip elements sitting at the kink in float16.
        z, mean, invstd = (f64(cp.asnumpy(d[k])) for k in ("z", "mean", "invstd"))
        cache["xhat"] = (z - mean[None, :, None]) * invstd[None, :, None]
        cache["invstd"] = invstd
        cache["pre"] = (f64(host["gamma"])[None, :, None] * cache["xhat"]
                        + f64(host["beta"])[None, :, None])
        return reference.conv1d_bn_relu_backward(f64(dy), cache)


def run_backward(host, conv, d, dy, batch_stats, relu=True):
    """The kernels' gradients (a dict named as the reference's) for what forward saved in d."""
    dt, pt = host["x"].dtype, host["gamma"].dtype
    cout = host["w"].shape[0]
    grads = dict(data=cp.empty(host["x"].shape, dt), weight=cp.empty(host["w"].shape, dt),
                 bias=cp.empty(cout, dt) if host["bias"] is not None else None,
                 gamma=cp.empty(cout, pt), beta=cp.empty(cout, pt))
    cuda.conv1d_bn_relu_backward(
        cp.asarray(dy), d["x"], d["w"], d["z"], d["gamma"], d["beta"], d["mean"], d["invstd"],
        grads["data"], grads["weight"], grads["bias"], grads["gamma"], grads["beta"],
        conv["stride"], conv["pad"], conv["dilate"], conv["num_group"], batch_stats, relu=relu)
    return {k: g for k, g in grads.items() if g is not None}


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_backward(case, dtypes, batch_stats, relu):
    check_backward(case, dtypes, batch_stats, relu)


def check_backward(case, dtypes, batch_stats, relu):
    """test_backward's checks; returns (inputs, conv, forward outputs, dy, the gradients)."""
    host, conv, dt, pt = make_inputs(case, dtypes)
    d = run_forward_train(host, conv, dt, pt, batch_stats, relu)
    dy = np.random.default_rng(1).standard_normal(d["z"].shape).astype(dt)
    ref = reference_backward(host, conv, d, dy, batch_stats, relu)
    grads = run_backward(host, conv, d, dy, batch_stats, relu)
    for name, got in grads.items():
        assert_close(got, ref[name], dt, f"{name}_grad")
    return host, conv, d, dy, grads


@pytest.mark.parametrize("wanted", [("data",), ("weight",), ("gamma", "beta"), ("bias",)])
def test_backward_partial_gradients(wanted):
    host, conv, dt, pt = make_inputs("groups2", "f32")
    d = run_forward_train(host, conv, dt, pt, True)
    dy = cp.asarray(np.random.default_rng(2).standard_normal(d["z"].shape).astype(dt))
    shapes = dict(data=host["x"].shape, weight=host["w"].shape, bias=(6,), gamma=(6,), beta=(6,))
    full = {k: cp.empty(v, dt) for k, v in shapes.items()}
    part = {k: (cp.empty(v, dt) if k in wanted else None) for k, v in shapes.items()}
    for g in (full, part):
        cuda.conv1d_bn_relu_backward(dy, d["x"], d["w"], d["z"], d["gamma"], d["beta"],
                                     d["mean"], d["invstd"], g["data"], g["weight"], g["bias"],
                                     g["gamma"], g["beta"], 1, 1, 1, 2, True)
    for k in wanted:
        np.testing.assert_array_equal(cp.asnumpy(part[k]), cp.asnumpy(full[k]))


def test_deterministic():
    host, conv, dt, pt = make_inputs("c64", "f32")
    outs = []
    for _ in range(2):
        d = run_forward_train(host, conv, dt, pt, True)
        dy = cp.asarray(np.random.default_rng(3).standard_normal(d["z"].shape).astype(dt))
        g = dict(data=cp.empty(host["x"].shape, dt), weight=cp.empty(host["w"].shape, dt),
                 bias=cp.empty(64, dt), gamma=cp.empty(64, pt), beta=cp.empty(64, pt))
        cuda.conv1d_bn_relu_backward(dy, d["x"], d["w"], d["z"], d["gamma"], d["beta"],
                                     d["mean"], d["invstd"], g["data"], g["weight"], g["bias"],
                                     g["gamma"], g["beta"], 1, 1, 1, 1, True)
        outs.append([cp.asnumpy(a) for a in (d["y"], d["mean"], d["invstd"], *g.values())])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Depthwise convs (one input channel per group, at most 8 output channels per group: the CPU
# engine's rule) run the conv1d_dw_* kernels. Besides the reference, they are held to the GEMM
# kernels on the same shape: z, the output, the statistics and every gradient but the weight's
# are the same number for number (the depthwise kernels accumulate in the GEMM's order and
# share its statistics code); the weight gradient sums in another order.

DW_CASES = {
    "dw_m1": ConvCase(2, 7, 97, 7, 3, 1, 1, 1, 7, True),  # tiles across the batch's rows
    "dw_m2_s2_d2_nobias": ConvCase(3, 6, 41, 12, 5, 2, 3, 2, 6, False),
    "dw_m8_s3": ConvCase(2, 3, 50, 24, 4, 3, 2, 1, 3, True),
    "dw_stride5_gt_k2": ConvCase(2, 5, 61, 5, 2, 5, 1, 1, 5, True),  # inputs no output reads
    "dw_pad5_gt_k3": ConvCase(2, 4, 9, 8, 3, 1, 5, 1, 4, True),  # outputs reading padding only
    "dw_lout1": ConvCase(3, 5, 7, 5, 7, 1, 0, 1, 5, True),
    "dw_width1_m2": ConvCase(5, 3, 1, 6, 3, 1, 1, 1, 3, True),
    "dw_k11_d3": ConvCase(2, 4, 80, 4, 11, 1, 15, 3, 4, False),  # two blocks of taps
    "dw_long": ConvCase(2, 3, 2500, 3, 3, 1, 1, 1, 3, True),  # weight gradient in 3 splits
}


@contextlib.contextmanager
def gemm_kernels_only():
    """Every conv on the GEMM kernels inside the block, depthwise shapes included."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_conv, "_DEPTHWISE_MAX_MULTIPLIER", 0)
        yield


@contextlib.contextmanager
def recorded_launches():
    """The names of the kernels launched inside the block, in order."""
    names, launch = [], loader.launch

    def recording(source, kernel, grid, block, args):
        names.append(kernel)
        launch(source, kernel, grid, block, args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader, "launch", recording)
        yield names


def assert_same_values(got, want, what):
    """Equal element for element (NaN where NaN); got and want are device arrays."""
    np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(want), err_msg=what)


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", DW_CASES)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_depthwise_forward_train(case, dtypes, batch_stats, relu):
    host, conv, d = check_forward_train(DW_CASES[case], dtypes, batch_stats, relu)
    with gemm_kernels_only():
        gemm = run_forward_train(host, conv, *DTYPES[dtypes], batch_stats, relu)
    for k in ("z", "y", "mean", "invstd", "rm", "rv"):
        assert_same_values(d[k], gemm[k], f"{k}: depthwise and GEMM kernels")


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", DW_CASES)
@pytest.mark.parametrize("relu", [True, False])
def test_depthwise_forward_infer(case, dtypes, relu):
    y = check_forward_infer(DW_CASES[case], dtypes, relu)
    with gemm_kernels_only():
        gemm = check_forward_infer(DW_CASES[case], dtypes, relu)
    assert_same_values(y, gemm, "out: depthwise and GEMM kernels")


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", DW_CASES)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_depthwise_backward(case, dtypes, batch_stats, relu):
    host, conv, d, dy, grads = check_backward(DW_CASES[case], dtypes, batch_stats, relu)
    with gemm_kernels_only():
        gemm = run_backward(host, conv, d, dy, batch_stats, relu)
    assert grads.keys() == gemm.keys()
    for k in grads.keys() - {"weight"}:
        assert_same_values(grads[k], gemm[k], f"{k}_grad: depthwise and GEMM kernels")


# Which kernels run: (case, depthwise?). One input channel per group and at most 8 outputs.
SELECTION = {
    "m1": (ConvCase(2, 4, 20, 4, 3, 1, 1, 1, 4, True), True),
    "m2": (ConvCase(2, 4, 20, 8, 3, 2, 1, 1, 4, True), True),
    "m8": (ConvCase(2, 2, 20, 16, 3, 1, 1, 1, 2, True), True),
    "one_input_channel": (ConvCase(2, 1, 20, 4, 3, 1, 1, 1, 1, True), True),
    "m9": (ConvCase(2, 2, 20, 18, 3, 1, 1, 1, 2, True), False),
    "two_inputs_per_group": (ConvCase(2, 4, 20, 4, 3, 1, 1, 1, 2, True), False),
    "dense": (ConvCase(2, 4, 20, 4, 3, 1, 1, 1, 1, True), False),
}


@pytest.mark.parametrize("dtypes", ["f32", "f16_p32"])
@pytest.mark.parametrize("case", SELECTION)
def test_depthwise_kernels_run_for_depthwise_shapes_only(case, dtypes):
    """The conv kernels each call launches, per shape: the depthwise ones exactly where the
    rule says, the GEMM ones elsewhere; the results meet the reference either way."""
    conv_case, depthwise = SELECTION[case]
    dsuf, msuf = dtypes[:3], dtypes
    prefix = "conv1d_dw_" if depthwise else "conv1d_"
    for run, kernel in [
            (lambda: check_forward_train(conv_case, dtypes, True, True), f"fwd_train_{dsuf}"),
            (lambda: check_forward_infer(conv_case, dtypes, True), f"fwd_infer_{msuf}")]:
        with recorded_launches() as names:
            run()
        assert [k for k in names if k.startswith("conv1d_")] == [prefix + kernel]
    with recorded_launches() as names:
        check_backward(conv_case, dtypes, True, True)
    assert [k for k in names if k.startswith("conv1d_")] == [
        prefix + "fwd_train_" + dsuf, prefix + "bwd_data_" + dsuf, prefix + "bwd_weight_" + dsuf]


@pytest.mark.parametrize("left_out", ["data", "weight", "bias", "gamma", "beta", "all"])
def test_depthwise_gradients_left_out(left_out):
    """Each optional gradient None in turn, and all of them: the others are the same as with
    every gradient wanted, and a conv gradient not wanted is not computed."""
    host, conv, dt, pt = make_inputs(DW_CASES["dw_m8_s3"], "f32")
    d = run_forward_train(host, conv, dt, pt, True)
    dy = cp.asarray(np.random.default_rng(2).standard_normal(d["z"].shape).astype(dt))
    cout = host["w"].shape[0]
    shapes = dict(data=host["x"].shape, weight=host["w"].shape, bias=(cout,), gamma=(cout,),
                  beta=(cout,))
    full = {k: cp.empty(v, dt) for k, v in shapes.items()}
    part = {k: (None if left_out in (k, "all") else cp.empty(v, dt)) for k, v in shapes.items()}
    launched = {}
    for name, g in (("full", full), ("part", part)):
        with recorded_launches() as launched[name]:
            cuda.conv1d_bn_relu_backward(dy, d["x"], d["w"], d["z"], d["gamma"], d["beta"],
                                         d["mean"], d["invstd"], g["data"], g["weight"],
                                         g["bias"], g["gamma"], g["beta"], conv["stride"],
                                         conv["pad"], conv["dilate"], conv["num_group"], True)
    for k, got in part.items():
        if got is not None:
            assert_same_values(got, full[k], f"{k}_grad with {left_out} left out")
    convs = {k for k in launched["part"] if k.startswith("conv1d_")}
    assert ("conv1d_dw_bwd_data_f32" in convs) == (part["data"] is not None)
    assert ("conv1d_dw_bwd_weight_f32" in convs) == (part["weight"] is not None)


def test_depthwise_results_do_not_depend_on_the_schedule(cuda_target, monkeypatch):
    """A training step (forward with batch statistics, backward with every gradient) in this
    target's schedule and then in the other one (on a GPU: once more) gives the same numbers,
    the weight gradient's block reductions and splits included."""
    def step(case):
        host, conv, dt, pt = make_inputs(DW_CASES[case], "f32")
        d = run_forward_train(host, conv, dt, pt, True)
        dy = np.random.default_rng(3).standard_normal(d["z"].shape).astype(dt)
        grads = run_backward(host, conv, d, dy, True)
        return [cp.asnumpy(a) for a in [d[k] for k in ("z", "y", "mean", "invstd", "rm", "rv")]
                + list(grads.values())]

    cases = ("dw_long", "dw_k11_d3", "dw_m8_s3")
    first = [step(c) for c in cases]
    if cuda_target[0] != "gpu":
        monkeypatch.setattr(cp.config, "schedule",
                            "reverse" if cp.config.schedule == "plain" else "plain")
    for case, a, b in zip(cases, first, [step(c) for c in cases]):
        for i, (x, y) in enumerate(zip(a, b)):
            np.testing.assert_array_equal(x, y, err_msg=f"{case}: output {i}")


def offset_buf(host, offset):
    """host on the device, as a contiguous view starting `offset` elements into its allocation
    (1: not 16-byte aligned, the elementwise kernels' scalar path)."""
    d = cp.empty(host.size + offset, host.dtype)
    d[offset:] = cp.asarray(host.ravel())
    return d[offset:].reshape(host.shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(2, 7, 97), (3, 64, 1025), (5,)])
@pytest.mark.parametrize("offset", [0, 1])
def test_add_relu(shape, dtype, offset):
    rng = np.random.default_rng(4)

    def buf(host):
        return offset_buf(host, offset)

    a, b, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    y = buf(np.zeros(shape, dtype))
    cuda.add_relu_forward(buf(a), buf(b), y)
    y_ref = reference.add_relu_forward(f64(a), f64(b))
    assert_close(y, y_ref, dtype, "out")
    ga_ref, _ = reference.add_relu_backward(f64(dy), f64(cp.asnumpy(y)))
    da, db = buf(np.zeros(shape, dtype)), buf(np.zeros(shape, dtype))
    cuda.add_relu_backward(buf(dy), y, da, db)
    np.testing.assert_array_equal(cp.asnumpy(da), ga_ref.astype(dtype))
    np.testing.assert_array_equal(cp.asnumpy(db), ga_ref.astype(dtype))
    only = buf(np.zeros(shape, dtype))
    cuda.add_relu_backward(buf(dy), y, None, only)
    np.testing.assert_array_equal(cp.asnumpy(only), ga_ref.astype(dtype))


def test_checks_name_the_argument():
    x = cp.zeros((2, 4, 10), np.float32)
    w = cp.zeros((4, 4, 3), np.float32)
    c = cp.zeros(4, np.float32)
    out = cp.zeros((2, 4, 10), np.float32)
    with pytest.raises(TypeError, match="weight must have the same dtype as data"):
        cuda.conv1d_bn_relu_forward_infer(x, w.astype(np.float16), None, c, c, c, c, out,
                                          1, 1, 1, 1, EPS)
    with pytest.raises(TypeError, match="data must be float32 or float16"):
        cuda.conv1d_bn_relu_forward_infer(x.astype(np.float64), w, None, c, c, c, c, out,
                                          1, 1, 1, 1, EPS)
    with pytest.raises(ValueError, match="data must be C-contiguous"):
        cuda.conv1d_bn_relu_forward_infer(x[:, :, ::2], w, None, c, c, c, c, out, 1, 1, 1, 1, EPS)
    with pytest.raises(ValueError, match="output must have shape"):
        cuda.conv1d_bn_relu_forward_infer(x, w, None, c, c, c, c, out[:, :, :9].copy(),
                                          1, 1, 1, 1, EPS)
    with pytest.raises(ValueError, match="num_group"):
        cuda.conv1d_bn_relu_forward_infer(x, w, None, c, c, c, c, out, 1, 1, 1, 3, EPS)
    with pytest.raises(TypeError, match="lhs must be a cupy.ndarray"):
        cuda.add_relu_forward(np.zeros(3, np.float32), cp.zeros(3, np.float32),
                              cp.zeros(3, np.float32))
    with pytest.raises(ValueError, match="lhs and rhs must have the same shape"):
        cuda.add_relu_forward(cp.zeros(3, np.float32), cp.zeros(4, np.float32),
                              cp.zeros(3, np.float32))


def test_launch_takes_numpy_scalars_and_refuses_python_numbers():
    """np.float64 is a subclass of float: the launch check once refused it, and with it every
    training forward (bn_fwd_finalize takes eps and momentum as doubles). Plain Python numbers
    are refused: CuPy would pass them as 8 bytes whatever the parameter's type."""
    c, m = 3, 100  # two column tiles of 64 and 36 values
    psum = np.array([[6.4, -3.2, 64.0], [7.2, 3.6, 0.0]], np.float32)
    pm2 = np.array([[12.8, 6.4, 0.0], [3.6, 7.2, 36.0]], np.float32)
    rm, rv = np.array([0.5, -0.5, 0.0], np.float32), np.array([1.0, 2.0, 0.5], np.float32)
    d = dict(psum=cp.asarray(psum), pm2=cp.asarray(pm2), rm=cp.asarray(rm), rv=cp.asarray(rv),
             mean=cp.empty(c, np.float32), invstd=cp.empty(c, np.float32))

    typed = dict(eps=np.float64(EPS), ntiles=np.int32(2), batch_stats=np.int32(1))

    def args(eps=typed["eps"], ntiles=typed["ntiles"], batch_stats=typed["batch_stats"]):
        return (d["psum"], d["pm2"], ntiles, np.int32(m), np.int32(c), d["rm"], d["rv"],
                d["mean"], d["invstd"], eps, np.float64(MOMENTUM), batch_stats)

    loader.launch("conv1d_bn_relu", "bn_fwd_finalize_f32", (c,), (256,), args())
    counts = np.array([64.0, 36.0])[:, None]
    mu = psum.astype(np.float64).sum(0) / m
    var = (pm2 + counts * (psum / counts - mu) ** 2).sum(0) / m
    assert_close(d["mean"], mu, np.float32, "mean")
    assert_close(d["invstd"], 1 / np.sqrt(var + EPS), np.float32, "invstd")
    assert_close(d["rm"], MOMENTUM * rm + (1 - MOMENTUM) * mu, np.float32, "running_mean")
    assert_close(d["rv"], MOMENTUM * rv + (1 - MOMENTUM) * var, np.float32, "running_var")
    for bad, match in [(dict(eps=EPS), "argument 9 is a Python float"),
                       (dict(ntiles=2), "argument 2 is a Python int"),
                       (dict(batch_stats=True), "argument 11 is a Python bool")]:
        with pytest.raises(TypeError, match=match):
            loader.launch("conv1d_bn_relu", "bn_fwd_finalize_f32", (c,), (256,), args(**bad))


# ---------------------------------------------------------------------------------------------
# Numbers in, numbers out: NaN and infinities propagate as IEEE arithmetic and the numpy
# reference say (the cases of tests/test_numerics.py, which holds the CPU implementations to
# the same): relu(NaN) = NaN, relu' = NaN at NaN, BatchNorm's own order of operations.

# As tests/test_numerics.py's; and its depthwise twin (multiplier 2), on the depthwise kernels.
NUMERICS_CASES = {"dense": ConvCase(2, 3, 13, 4, 3, 1, 1, 1, 1, True),
                  "depthwise": ConvCase(2, 3, 13, 6, 3, 1, 1, 1, 3, True)}


def assert_same_numbers(got, want, dtype, what):
    """Same NaN, +inf and -inf positions, and finite values within the dtype's tolerance."""
    got, want = cp.asnumpy(got).astype(np.float64), np.asarray(want, np.float64)
    for kind, where in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        np.testing.assert_array_equal(where(got), where(want), err_msg=f"{what}: {kind}")
    finite = np.isfinite(want)
    if finite.any():
        assert_close(got[finite], want[finite], dtype, f"{what}: finite values")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("offset", [0, 1])
def test_add_relu_keeps_nan_and_inf(dtype, offset):
    """Forward relu(NaN) = NaN; backward dy * relu'(y): NaN where y is NaN, and where the relu
    is closed but dy is NaN or infinite (dy * 0). 17 values: vectors and a scalar tail."""
    inf, nan = np.inf, np.nan
    a = np.array([nan, -1, 2, inf, -inf, .5, -2, 3, inf, -1, 1, 0, 0, -inf, 2, 1, 1.5], dtype)
    b = np.array([0, .5, nan, -inf, 1, -1, 1, nan, 1, -1, 1, 0, -0., 1, inf, -inf, 0], dtype)
    dy = np.array([1, 1, 1, 1, 1, nan, inf, 1, -inf, nan, nan, inf, 1, 1, 1, 1, -inf], dtype)
    y = offset_buf(np.zeros_like(a), offset)
    with np.errstate(invalid="ignore"):
        y_ref = reference.add_relu_forward(f64(a), f64(b))
        cuda.add_relu_forward(offset_buf(a, offset), offset_buf(b, offset), y)
        assert_same_numbers(y, y_ref, dtype, "add_relu forward")
        g_ref, _ = reference.add_relu_backward(f64(dy), y_ref)
    da, db = offset_buf(np.zeros_like(a), offset), offset_buf(np.zeros_like(a), offset)
    cuda.add_relu_backward(offset_buf(dy, offset), y, da, db)
    assert_same_numbers(da, g_ref, dtype, "lhs gradient")
    assert_same_numbers(db, g_ref, dtype, "rhs gradient")
    got = cp.asnumpy(da)
    assert np.isnan(cp.asnumpy(y)[[0, 2, 3]]).all() and np.isnan(got[[0, 5, 6, 9, 11]]).all()


@pytest.mark.parametrize("case", NUMERICS_CASES)
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_nonfinite_gamma_in_inference_is_not_folded_away(value, dtypes, case):
    """gamma = +-inf or NaN in one channel: BatchNorm computes (z - mean) * gamma * invstd +
    beta, which is +inf, -inf (0 after the relu) or NaN element by element, where a folded
    shift once gave inf - inf = NaN or 0. Inference and the training path with running
    statistics both."""
    host, conv, dt, pt = make_inputs(NUMERICS_CASES[case], dtypes, seed=1)
    host["gamma"][1] = value
    z = reference.conv1d(f64(host["x"]), f64(host["w"]), f64(host["bias"]), **conv)
    assert np.abs(z[:, 1] - host["rm"][1]).min() > 1e-2  # no z at the mean: no 0 * inf
    with np.errstate(invalid="ignore"):
        ref = reference.conv1d_bn_relu_forward(
            f64(host["x"]), f64(host["w"]), f64(host["bias"]), f64(host["gamma"]),
            f64(host["beta"]), f64(host["rm"]), f64(host["rv"]), eps=EPS, is_train=False,
            **conv)[0]
    assert not np.isfinite(ref[:, 1]).all() and np.isfinite(np.delete(ref, 1, axis=1)).all()
    d = {k: dev(v) for k, v in host.items()}
    y = cp.empty(ref.shape, dt)
    cuda.conv1d_bn_relu_forward_infer(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"],
                                      d["rv"], y, conv["stride"], conv["pad"], conv["dilate"],
                                      conv["num_group"], EPS)
    assert_same_numbers(y, ref, dt, "inference")
    d = run_forward_train(host, conv, dt, pt, batch_stats=False)
    assert_same_numbers(d["y"], ref, dt, "training forward with running statistics")


@pytest.mark.parametrize("case", NUMERICS_CASES)
@pytest.mark.parametrize("dtypes", ["f32", "f16_p32"])
@pytest.mark.parametrize("bad", ["nan_and_inf", "inf"])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_nonfinite_data_reaches_outputs_and_gradients(bad, batch_stats, dtypes, case):
    """NaN and +inf in the data, forward (training with batch statistics, or with running
    statistics as after an inference forward; and inference) and backward, against the
    reference. With running statistics an infinite z must leave the data gradient finite: the
    batch terms are left out, not multiplied by 0 (inf * 0 = NaN)."""
    host, conv, dt, pt = make_inputs(NUMERICS_CASES[case], dtypes, seed=2)
    if bad == "nan_and_inf":
        host["x"][0, 1, 5] = np.nan
    host["x"][1, 2, 7] = np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        y_ref, _, rm_ref, rv_ref = reference.conv1d_bn_relu_forward(
            f64(host["x"]), f64(host["w"]), f64(host["bias"]), f64(host["gamma"]),
            f64(host["beta"]), f64(host["rm"]), f64(host["rv"]), eps=EPS, momentum=MOMENTUM,
            is_train=True, use_global_stats=not batch_stats, **conv)
        z_ref = reference.conv1d(f64(host["x"]), f64(host["w"]), f64(host["bias"]), **conv)
    d = run_forward_train(host, conv, dt, pt, batch_stats)
    assert_same_numbers(d["z"], z_ref, dt, "z")
    assert_same_numbers(d["y"], y_ref, dt, "output")
    assert_same_numbers(d["rm"], rm_ref, dt, "running_mean")
    assert_same_numbers(d["rv"], rv_ref, dt, "running_var")
    if not batch_stats:
        y = cp.empty(y_ref.shape, dt)
        d0 = {k: dev(v) for k, v in host.items()}
        cuda.conv1d_bn_relu_forward_infer(d0["x"], d0["w"], d0["bias"], d0["gamma"], d0["beta"],
                                          d0["rm"], d0["rv"], y, conv["stride"], conv["pad"],
                                          conv["dilate"], conv["num_group"], EPS)
        assert_same_numbers(y, y_ref, dt, "inference")
    dy = np.random.default_rng(3).standard_normal(y_ref.shape).astype(dt)
    ref = reference_backward(host, conv, d, dy, batch_stats)
    got = run_backward(host, conv, d, dy, batch_stats)
    for name, g in got.items():
        assert_same_numbers(g, ref[name], dt, f"{name} gradient")
    assert np.isnan(cp.asnumpy(d["y"])).any() == (bad == "nan_and_inf" or batch_stats)
    if bad == "inf" and not batch_stats:
        assert np.isfinite(cp.asnumpy(got["data"])).all()


# ---------------------------------------------------------------------------------------------
# Limits: every hyper-parameter may be as large as the ops allow (MAX_EXTENT = 2**31 - 1);
# input positions then pass 2**31.
LIMIT_CASES = {
    "stride": ConvCase(2, 3, 5, 4, 3, 2**31 - 1, 0, 1, 1, True),
    # output 3 wide: columns 0 and 2 read only padding, column 2 from position 2**31 - 1 on
    "stride_and_pad": ConvCase(2, 3, 5, 4, 3, 2**31 - 1, 2**31 - 1, 1, 1, True),
    # output 2 wide: column 0 reads x[2] by its second tap (at -pad + dilation), column 1 by
    # its first; the other taps fall 2**31 - 1 away
    "dilation": ConvCase(2, 3, 7, 4, 2, 2**31 - 1, 2**31 - 3, 2**31 - 1, 1, True),
    # the same on the depthwise kernels (multiplier 2)
    "dw_stride": ConvCase(2, 3, 5, 6, 3, 2**31 - 1, 0, 1, 3, True),
    "dw_stride_and_pad": ConvCase(2, 3, 5, 6, 3, 2**31 - 1, 2**31 - 1, 1, 3, True),
    "dw_dilation": ConvCase(2, 3, 7, 6, 2, 2**31 - 1, 2**31 - 3, 2**31 - 1, 3, True),
}


def gathered(host, conv):
    """The case as a stride-K conv of the gathered windows xg[n, c, l * K + t] =
    x[n, c, l * stride - pad + t * dilation] (zero outside the input), which the reference can
    compute; and the positions, to scatter xg's gradient back."""
    x, k = host["x"], host["w"].shape[2]
    lout = reference.conv1d_out_width(x.shape[2], k, conv["stride"], conv["pad"],
                                      conv["dilate"])
    pos = (np.arange(lout)[:, None] * conv["stride"] - conv["pad"]
           + np.arange(k)[None, :] * conv["dilate"])  # int64
    inside = (pos >= 0) & (pos < x.shape[2])
    xg = np.where(inside, x[:, :, np.clip(pos, 0, x.shape[2] - 1)], 0).astype(x.dtype)
    return dict(host, x=xg.reshape(x.shape[0], x.shape[1], lout * k)), pos, inside


@pytest.mark.parametrize("case", LIMIT_CASES)
def test_hyper_parameters_at_the_limit(case):
    host, conv, dt, pt = make_inputs(LIMIT_CASES[case], "f32")
    g_host, pos, inside = gathered(host, conv)
    assert inside.any()
    k = host["w"].shape[2]
    g_conv = dict(stride=k, pad=0, dilate=1, num_group=conv["num_group"])
    y_ref, cache, rm_ref, rv_ref = reference.conv1d_bn_relu_forward(
        f64(g_host["x"]), f64(host["w"]), f64(host["bias"]), f64(host["gamma"]),
        f64(host["beta"]), f64(host["rm"]), f64(host["rv"]), eps=EPS, momentum=MOMENTUM,
        is_train=True, **g_conv)
    d = run_forward_train(host, conv, dt, pt, True)
    assert d["y"].shape == y_ref.shape
    assert_close(d["y"], y_ref, dt, "out")
    assert_close(d["rm"], rm_ref, dt, "running_mean")
    assert_close(d["rv"], rv_ref, dt, "running_var")
    dy = np.random.default_rng(1).standard_normal(y_ref.shape).astype(dt)
    ref = reference_backward(g_host, g_conv, d, dy, True)
    dxg = ref["data"].reshape(host["x"].shape[:2] + pos.shape)
    ref["data"] = np.zeros(host["x"].shape)
    np.add.at(ref["data"], (slice(None), slice(None), pos[inside]), dxg[:, :, inside])
    for name, g in run_backward(host, conv, d, dy, True).items():
        assert_close(g, ref[name], dt, f"{name}_grad")
    y_inf = reference.conv1d_bn_relu_forward(
        f64(g_host["x"]), f64(host["w"]), f64(host["bias"]), f64(host["gamma"]),
        f64(host["beta"]), f64(host["rm"]), f64(host["rv"]), eps=EPS, is_train=False,
        **g_conv)[0]
    h = {k: dev(v) for k, v in host.items()}
    y = cp.empty(y_inf.shape, dt)
    cuda.conv1d_bn_relu_forward_infer(h["x"], h["w"], h["bias"], h["gamma"], h["beta"], h["rm"],
                                      h["rv"], y, conv["stride"], conv["pad"], conv["dilate"],
                                      conv["num_group"], EPS)
    assert_close(y, y_inf, dt, "inference")


@pytest.mark.parametrize("data, weight, stride, pad, dilate, num_group, eps", BAD_KERNEL_CALLS)
def test_bad_calls_get_the_spec_message(data, weight, stride, pad, dilate, num_group, eps):
    """fusedres.cuda refuses bad calls with fusedres.attrs.ConvAttrs.for_kernel's message, in
    each of the three kernels (as fusedres._C does, tests/test_kernels_cpu.py)."""
    assert_refused_as_the_spec_says(cuda, lambda shape: cp.zeros(shape, np.float32), data,
                                    weight, stride, pad, dilate, num_group, eps)


def test_beyond_the_kernels_limits_raise_named_errors():
    """What the ops accept but the kernels cannot index or launch is a ValueError naming the
    argument: an output in the last 2**16 below 2**31 elements, more than 65535 groups or
    65535 tiles of channels per group; hyper-parameters past 2**31 - 1 likewise."""
    def zeros(*shape):
        return cp.zeros(shape, np.float32)

    def infer(x, w, stride=1, pad=0, dilate=1, num_group=1):
        c = zeros(w.shape[0])
        out = zeros(x.shape[0], w.shape[0], 1)
        cuda.conv1d_bn_relu_forward_infer(x, w, None, c, c, c, c, out, stride, pad, dilate,
                                          num_group, EPS)

    x, w = zeros(1, 2, 5), zeros(1, 2, 3)
    for kw, match in [(dict(stride=2**31), "stride must be <= 2147483647"),
                      (dict(pad=2**31), "pad must be <= 2147483647"),
                      (dict(dilate=2**31), "dilate must be <= 2147483647"),
                      (dict(pad=2**30 - 2**14), r"pad \(1073725440\) and stride \(1\) give an "
                                                r"output of 1 x 1 x 2147450883 elements")]:
        with pytest.raises(ValueError, match=match):
            infer(x, w, **kw)
    with pytest.raises(ValueError,
                       match="num_group must be <= 65535 for the CUDA kernels, got 65536"):
        infer(zeros(1, 131072, 1), zeros(65536, 2, 1), num_group=65536)
    with pytest.raises(ValueError, match=r"weight's out_channels per group \(4194304\) must be "
                                         r"<= 4194240"):
        infer(zeros(1, 1, 1), zeros(2**22, 1, 1))
    with pytest.raises(ValueError, match=r"data's channels per group \(4194304\) must be "
                                         r"<= 4194240"):
        infer(zeros(1, 2**22, 1), zeros(1, 2**22, 1))
    # The depthwise launches' backstop (no shape the checks above accept gets there).
    assert cuda_conv._grid(2**31 - 1, 65535) == (2**31 - 1, 65535)
    for grid, match in [((2**31,), r"grid \(2147483648,\) exceeds the CUDA limit of 2147483647 "
                                   r"blocks on axis x"),
                        ((1, 65536), r"grid \(1, 65536\) exceeds the CUDA limit of 65535 blocks "
                                     r"on axis y")]:
        with pytest.raises(ValueError, match=match):
            cuda_conv._grid(*grid)


def test_depthwise_convs_take_more_than_65535_groups():
    """The depthwise kernels' grids are one-dimensional: no bound on num_group from the grid's
    z axis, which limits the GEMM kernels (the test above)."""
    c = 65536
    rng = np.random.default_rng(6)
    x, w, bias, beta, rm = (rng.standard_normal(s).astype(np.float32)
                            for s in ((1, c, 1), (c, 1, 1), c, c, c))
    gamma, rv = (rng.uniform(0.5, 1.5, c).astype(np.float32) for _ in range(2))
    y = cp.empty((1, c, 1), np.float32)
    with recorded_launches() as names:
        cuda.conv1d_bn_relu_forward_infer(*(cp.asarray(a) for a in (x, w, bias, gamma, beta, rm,
                                                                    rv)), y, 1, 0, 1, c, EPS)
    assert names == ["conv1d_dw_fwd_infer_f32"]
    z = f64(x)[0, :, 0] * f64(w)[:, 0, 0] + bias
    ref = np.maximum((z - rm) * gamma / np.sqrt(f64(rv) + EPS) + beta, 0)
    assert_close(y, ref[None, :, None], np.float32, "out")


# Mutants of the kernel sources that the checks must catch: name: (file, original, mutant).
MUTATIONS = {
    "gemm_tile without the barrier after the loads": (
        "conv1d_bn_relu.cu", "    __syncthreads();\n#pragma unroll\n    for (int kk",
        "#pragma unroll\n    for (int kk"),
    "gemm_tile without the barrier before the next loads": (
        "conv1d_bn_relu.cu", "    __syncthreads();\n  }\n}", "  }\n}"),
    "block_sum without the barrier before reusing warp_part": (
        "common.cuh", "  __syncthreads();  // warp_part may still be read by a previous call\n",
        ""),
    "block_sum without the barrier between writes and reads": (
        "common.cuh", "warp_part[warp] = v;\n  __syncthreads();\n", "warp_part[warp] = v;\n"),
    "block_sum shuffles with width 16": (
        "common.cuh", "v += __shfl_xor_sync(0xffffffffu, v, o);",
        "v += __shfl_xor_sync(0xffffffffu, v, o, 16);"),
    "half_warp_sum shuffles across both half warps": (
        "conv1d_bn_relu.cu", "for (int o = 8; o > 0;", "for (int o = 16; o > 0;"),
}


# Mutants of the depthwise kernels, which the depthwise checks must catch.
DW_MUTATIONS = {
    "depthwise forward reads input channel co % Cin, not co / mult": (
        "conv1d_bn_relu.cu", "((size_t)n * s.Cin + co / mult) * s.L",
        "((size_t)n * s.Cin + co % s.Cin) * s.L"),
    "depthwise data gradient takes inexact divisions by the stride": (
        "conv1d_bn_relu.cu", "if (l * stride == ut && l < (unsigned)s.Lout)",
        "if (l < (unsigned)s.Lout)"),
    "depthwise weight gradient leaves out the last tap of a block": (
        "conv1d_bn_relu.cu", "ntaps = min(DW_TAPS, s.K - tap0)",
        "ntaps = min(DW_TAPS - 1, s.K - tap0)"),
    # z is right; only the statistics' order of summation changes, which the reference's
    # tolerance cannot see and the comparison with the GEMM kernels does
    "depthwise forward statistics in another lane layout": (
        "conv1d_bn_relu.cu", "const int m = col0 + tx + 16 * j;\n    ok[j] = live",
        "const int m = col0 + 4 * tx + j;\n    ok[j] = live"),
}


@pytest.fixture(scope="module")
def mutant_source(tmp_path_factory):
    """mutant_source(name): a copy of the CUDA sources with that mutation. All are made at once
    and, on the emulation, their conv kernels (the checks' kernels) built in parallel with the
    options fusedres.cuda compiles with: the emulation caches builds on disk by preprocessed
    source and options, so the checks' launches find them built."""
    made = {}
    for mutation, (name, old, new) in {**MUTATIONS, **DW_MUTATIONS}.items():
        src = made[mutation] = tmp_path_factory.mktemp("cuda_src")
        for f in loader.SOURCE_DIR.iterdir():
            if f.suffix in (".cu", ".cuh"):
                (src / f.name).write_text(f.read_text())
        text = (src / name).read_text()
        assert text.count(old) == 1, f"{mutation}: the original text is not once in {name}"
        (src / name).write_text(text.replace(old, new))
    if "gpu" not in cuda_targets():
        from cuda_emu import build

        jobs = []
        with pytest.MonkeyPatch.context() as mp:
            for src in made.values():
                mp.setattr(loader, "SOURCE_DIR", src)
                opts = loader.NVRTC_OPTIONS + tuple(f"-I{d}" for d in loader.nvrtc_include_dirs())
                jobs.append(((src / "conv1d_bn_relu.cu").read_text(), opts))
        with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
            list(pool.map(lambda job: build.build(*job), jobs))
    return made.__getitem__


def _run_mutant(mutation, cuda_target, mutant_source, monkeypatch, checks):
    """The failures of checks ((what, fn) pairs) with the mutant compiled in place of csrc/cuda.
    On the emulation only: its schedules are deterministic, a GPU's are not."""
    if cuda_target[0] == "gpu":
        pytest.skip("mutants run on the CPU emulation of CUDA only")
    monkeypatch.setattr(loader, "SOURCE_DIR", mutant_source(mutation))
    monkeypatch.setattr(loader, "_modules", {})
    failed = []
    for what, check in checks:
        try:
            check()
        except Exception as e:  # a wrong result, or a check of the emulation (a deadlock)
            failed.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    print(f"{mutation} [{cuda_target[0]}]: {len(failed)} of {len(checks)} checks failed",
          *failed, sep="\n")
    return failed


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_mutant_fails_the_checks(mutation, cuda_target, mutant_source, monkeypatch):
    """A mutated copy of csrc/cuda (a barrier removed, a shuffle width broken) fails the float32
    forward (training, inference) and backward checks, in each schedule."""
    checks = []
    for case in CASES:
        checks += [
            (f"forward_train {case}", lambda c=case: test_forward_train(c, "f32", True, True)),
            (f"forward_infer {case}", lambda c=case: test_forward_infer(c, "f32", True)),
            (f"backward {case}", lambda c=case: test_backward(c, "f32", True, True))]
    failed = _run_mutant(mutation, cuda_target, mutant_source, monkeypatch, checks)
    assert failed, f"{mutation}: all {len(checks)} checks passed on the mutant"


@pytest.mark.parametrize("mutation", DW_MUTATIONS)
def test_depthwise_mutant_fails_the_checks(mutation, cuda_target, mutant_source, monkeypatch):
    """A mutated depthwise kernel fails the float32 depthwise checks (the reference, and the
    GEMM kernels' numbers), in each schedule."""
    checks = []
    for case in DW_CASES:
        checks += [
            (f"forward_train {case}",
             lambda c=case: test_depthwise_forward_train(c, "f32", True, True)),
            (f"forward_infer {case}", lambda c=case: test_depthwise_forward_infer(c, "f32", True)),
            (f"backward {case}", lambda c=case: test_depthwise_backward(c, "f32", True, True))]
    failed = _run_mutant(mutation, cuda_target, mutant_source, monkeypatch, checks)
    assert failed, f"{mutation}: all {len(checks)} checks passed on the mutant"


# Races that one order of warps hides and the other shows, on the backward of case c64 (the
# plain order runs writers in low warps before readers in high ones, the reverse order the
# opposite): why the emulated suite runs in both.
SCHEDULE_DEPENDENT = {"block_sum without the barrier before reusing warp_part": "emu-reverse",
                      "block_sum without the barrier between writes and reads": "emu-plain"}


@pytest.mark.parametrize("mutation", SCHEDULE_DEPENDENT)
def test_one_schedule_shows_what_the_other_hides(mutation, cuda_target, mutant_source,
                                                  monkeypatch):
    checks = [("backward c64", lambda: test_backward("c64", "f32", True, True))]
    failed = _run_mutant(mutation, cuda_target, mutant_source, monkeypatch, checks)
    assert bool(failed) == (cuda_target[0] == SCHEDULE_DEPENDENT[mutation]), failed
