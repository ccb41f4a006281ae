"""What the tests share: the one tolerance table, the conv cases (ConvCase), random inputs, the
float64 reference step and the MXNet helpers. Imported as `helpers` (tests/ is on sys.path);
MXNet is imported only inside the helpers that need it, so that the CUDA kernel tests also run
on a GPU machine without MXNet (conftest.py). conftest.py holds only fixtures and hooks."""
import functools
import os
from typing import NamedTuple

import numpy as np
import pytest

# One tolerance table: each row is one kind of comparison, named where it is used.
TOL = {
    # An implementation (fused ops, blocks, the configuration matrix) against the float64
    # reference of the same inputs: max|actual - expected| <= TOL * max(max|expected|, 1)
    # (assert_close). float32 results are judged against the float64 reference of the same
    # (float32) inputs.
    "impl": {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 2e-4,
             np.dtype(np.float16): 1e-2},
    # The CPU kernels (fusedres._C) and the reference against each other or stock MXNet:
    # max|actual - expected| <= TOL * scale (scale: max|expected| or a natural magnitude).
    "kernel": {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4},
    # The 5-point central difference in float64 (tests/test_reference.py).
    "fd": 1e-9,
    # The CUDA kernels, by data dtype: max|got - ref| <= atol + rtol * max|ref|, as (atol, rtol).
    "cuda": {np.dtype(np.float32): (1e-4, 1e-4), np.dtype(np.float16): (1e-2, 1e-2)},
    # Data-parallel training against one device, float32 both: (rtol, atol) of assert_allclose.
    "data_parallel": (1e-6, 1e-7),
}

EPS = 1e-5
# MXNet keeps BatchNorm's momentum as a C float; the ops round it the same way.
MOMENTUM = float(np.float32(0.9))


class ConvCase(NamedTuple):
    """One conv1d configuration of the tests, in one field order everywhere."""
    n: int
    cin: int
    width: int
    cout: int
    kernel: int
    stride: int = 1
    pad: int = 0
    dilate: int = 1
    num_group: int = 1
    bias: bool = True


# Odd sizes on purpose.
CONV_CASES = [
    pytest.param(ConvCase(2, 7, 97, 7, 3, 1, 1, 1, 1, True), id="c7-w97"),
    pytest.param(ConvCase(3, 64, 33, 64, 3, 1, 1, 1, 1, True), id="c64"),
    pytest.param(ConvCase(2, 6, 41, 10, 3, 2, 1, 1, 1, True), id="stride2"),
    pytest.param(ConvCase(2, 5, 37, 7, 3, 1, 2, 2, 1, True), id="dilation2"),
    pytest.param(ConvCase(2, 8, 29, 6, 5, 1, 2, 1, 2, True), id="groups2"),
    pytest.param(ConvCase(3, 7, 23, 9, 3, 1, 0, 1, 1, False), id="no-bias-pad0"),
    pytest.param(ConvCase(1, 3, 5, 4, 5, 3, 2, 1, 1, True), id="lout1-ish"),
    # depthwise (groups == in channels) runs its own CPU kernels (csrc/cpu/engine/depthwise.h)
    pytest.param(ConvCase(3, 8, 45, 8, 3, 1, 1, 1, 8, True), id="depthwise"),
    pytest.param(ConvCase(2, 6, 41, 12, 5, 2, 3, 2, 6, False), id="depthwise-mult2-s2-d2"),
]


def assert_close(actual, expected, dtype, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1.0)
    tol = TOL["impl"][np.dtype(dtype)]
    assert err <= tol, f"{what}: relative error {err:.3g} ({np.dtype(dtype)})"


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


GRAD_NAMES = ["data", "weight", "bias", "gamma", "beta"]


def reference_step(inp, conv, is_train=True, use_global_stats=False, seed=1, relu=True):
    """float64 reference of one conv1d_bn_relu step on conv_inputs: output, the head gradient
    (kept away from the relu kink), all gradients and the updated running statistics."""
    from fusedres import reference as R
    f64 = {k: None if v is None else v.astype(np.float64) for k, v in inp.items()}
    y, cache, rm, rv = R.conv1d_bn_relu_forward(
        f64["data"], f64["weight"], f64["bias"], f64["gamma"], f64["beta"],
        f64["running_mean"], f64["running_var"], conv["stride"], conv["pad"], conv["dilate"],
        conv["num_group"], EPS, MOMENTUM, is_train=is_train, use_global_stats=use_global_stats,
        relu=relu)
    dy = away_from_kink(np.random.default_rng(seed).standard_normal(y.shape), cache["pre"])
    return y, dy, R.conv1d_bn_relu_backward(dy, cache), rm, rv


def nd_inputs(inp, grad_req="write"):
    """conv_inputs as NDArrays, with gradients attached to data and the parameters."""
    import mxnet as mx
    arrs = {k: None if v is None else mx.nd.array(v, dtype=v.dtype) for k, v in inp.items()}
    for k in GRAD_NAMES:
        if arrs[k] is not None:
            arrs[k].attach_grad(grad_req)
    return arrs


def run_step(fn, arrs, conv, dy, train_mode=True, **kw):
    """One recorded forward of fn (a conv1d_bn_relu implementation) and its backward."""
    import mxnet as mx
    with mx.autograd.record(train_mode=train_mode):
        y = fn(arrs["data"], arrs["weight"], arrs["bias"], arrs["gamma"], arrs["beta"],
               arrs["running_mean"], arrs["running_var"], **kw, **conv)
    y.backward(mx.nd.array(dy, dtype=y.dtype))
    return y


def assert_step(arrs, y, ref_y, grads, rm, rv, dtype):
    """Output, every attached gradient and the running statistics against the reference."""
    assert_close(y.asnumpy(), ref_y, dtype, "output")
    for k in GRAD_NAMES:
        if arrs[k] is not None:
            assert_close(arrs[k].grad.asnumpy(), grads[k], dtype, f"{k} gradient")
    assert_close(arrs["running_mean"].asnumpy(), rm, dtype, "running_mean")
    assert_close(arrs["running_var"].asnumpy(), rv, dtype, "running_var")


def conv_with_ones(fn, data, **kw):
    """fn (a conv1d_bn_relu implementation) on data with all-ones parameters sized from data:
    for bad-input tests, where only the data or the hyper-parameters are wrong."""
    import mxnet as mx
    params = dict(kernel=3, num_filter=4)
    params.update(kw)
    c = params["num_filter"]
    cin = data.shape[1] if data.ndim > 1 else 1
    w = mx.nd.ones((c, max(cin // params.get("num_group", 1), 1), params["kernel"]),
                   dtype=data.dtype)
    one = mx.nd.ones((c,), dtype=data.dtype)
    return fn(data, w, one, one, one, one * 0, one, **params)


# CUDA kernel tests run on CuPy with a GPU; without one (or with FUSEDRES_CUDA_EMULATOR=1) on the
# CPU emulation of CUDA in tests/cuda_emu, once per schedule: "plain", and "reverse" (warps and
# blocks in reverse order, which exposes barriers that the plain order hides).
# FUSEDRES_CUDA_EMU_SCHEDULE=plain|reverse runs the emulation in that schedule only;
# FUSEDRES_CUDA_EMULATOR=0 refuses the emulation (make gpu-check: no GPU is an error).
@functools.lru_cache(maxsize=None)
def cuda_targets():
    mode = os.environ.get("FUSEDRES_CUDA_EMULATOR")
    if mode != "1":
        from fusedres import cuda
        ok, why = cuda.available()
        if ok:
            return ("gpu",)
        if mode == "0":
            raise RuntimeError(f"FUSEDRES_CUDA_EMULATOR=0 but CuPy has no GPU: {why}")
    only = os.environ.get("FUSEDRES_CUDA_EMU_SCHEDULE")
    return tuple(f"emu-{s}" for s in ("plain", "reverse") if only in (None, s))


# Bad kernel calls: (data shape, weight shape, stride, pad, dilate, num_group, eps). Every
# kernel wrapper (fusedres._C, fusedres.cuda) refuses each with the ValueError message of
# fusedres.attrs.ConvAttrs.for_kernel, the one spec.
BAD_KERNEL_CALLS = [
    pytest.param((2, 4, 10), (6, 4, 3), 0, 0, 1, 1, 1e-5, id="stride0"),
    pytest.param((2, 4, 10), (6, 4, 3), 2**31, 0, 1, 1, 1e-5, id="stride-2**31"),
    pytest.param((2, 4, 10), (6, 4, 3), 1, -1, 1, 1, 1e-5, id="pad-1"),
    pytest.param((2, 4, 10), (6, 4, 3), 1, 0, 0, 1, 1e-5, id="dilate0"),
    pytest.param((2, 4, 10), (6, 4, 3), 1, 0, 1, 0, 1e-5, id="num_group0"),
    pytest.param((2, 4, 10), (6, 4, 3), 1, 0, 1, 4, 1e-5, id="num_group-vs-num_filter"),
    pytest.param((2, 4, 10), (6, 1, 3), 1, 0, 1, 3, 1e-5, id="num_group-vs-channels"),
    pytest.param((2, 4, 10), (6, 3, 3), 1, 0, 1, 1, 1e-5, id="weight-in-channels"),
    pytest.param((2, 4, 10), (6, 4, 12), 1, 0, 1, 1, 1e-5, id="kernel-wider-than-data"),
    pytest.param((2, 4, 10), (6, 4, 3), 1, 0, 5, 1, 1e-5, id="dilated-wider-than-data"),
    pytest.param((0, 4, 10), (6, 4, 3), 1, 0, 1, 1, 1e-5, id="zero-batch"),
    pytest.param((2, 4, 10), (6, 0, 3), 1, 0, 1, 1, 1e-5, id="zero-weight"),
    pytest.param((2, 4, 10), (6, 4), 1, 0, 1, 1, 1e-5, id="weight-2d"),
    pytest.param((4, 10), (6, 4, 3), 1, 0, 1, 1, 1e-5, id="data-2d"),
    pytest.param((2, 4, 10), (6, 4, 3), 1, 0, 1, 1, 0.0, id="eps0"),
    pytest.param((2, 4, 10), (6, 4, 3), 1, 0, 1, 1, float("nan"), id="eps-nan"),
]


def assert_refused_as_the_spec_says(kernels, zeros, data, weight, stride, pad, dilate,
                                    num_group, eps):
    """Each conv kernel of `kernels` (fusedres._C or fusedres.cuda; `zeros(shape)` makes its
    float32 arrays) refuses a BAD_KERNEL_CALLS call with ConvAttrs.for_kernel's message, word
    for word."""
    from fusedres.attrs import ConvAttrs
    with pytest.raises(ValueError) as err:
        ConvAttrs.for_kernel(data, weight, stride, pad, dilate, num_group, eps)
    want = str(err.value)
    x, w, c = zeros(data), zeros(weight), zeros((weight[0],)) + 1
    out = zeros((max(data[0], 1), weight[0], 1)) if len(data) == 3 else c
    conv = (stride, pad, dilate, num_group)
    calls = {
        "forward_train": lambda: kernels.conv1d_bn_relu_forward_train(
            x, w, None, c, c, c.copy(), c.copy(), out, c.copy(), c.copy(), out.copy(), *conv,
            eps, MOMENTUM, True),
        "forward_infer": lambda: kernels.conv1d_bn_relu_forward_infer(
            x, w, None, c, c, c, c, out, *conv, eps),
    }
    if eps == EPS:  # the backward takes no eps
        calls["backward"] = lambda: kernels.conv1d_bn_relu_backward(
            out, x, w, out, c, c, c, c, None, None, None, None, None, *conv, True)
    for name, call in calls.items():
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == want, name
