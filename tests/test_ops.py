"""Both implementations of the ops (the MXNet operators and the CustomOps, the `impl` fixture)
against the numpy reference and MXNet's stock ops: forward, all gradients, running statistics,
req write/add/null, numeric gradients in float64."""
import functools

import mxnet as mx
import numpy as np
import pytest
from helpers import (CONV_CASES, GRAD_NAMES, TOL, assert_close, assert_step, away_from_kink,
                      conv_inputs, nd_inputs, reference_step, run_step)
from mxnet import autograd
from mxnet.test_utils import check_numeric_gradient

import fusedres
from fusedres import reference as R

DTYPES = [np.float32, np.float64]
_reference, _nd, _assert_step = reference_step, nd_inputs, assert_step


def _op(impl):
    return functools.partial(fusedres.conv1d_bn_relu, use_native=impl)


def _fused(impl, arrs, conv, dy, train_mode=True, **kw):
    return run_step(_op(impl), arrs, conv, dy, train_mode=train_mode, **kw)


def _stock(arrs, conv, dy, use_global_stats=False, relu=True):
    """MXNet's own Convolution + BatchNorm + relu, run as a (1, k) 2-D conv: the 1-D route
    crashes in backward with MKLDNN on (docs/mxnet-facts.md); the math is identical."""
    n, c, w = arrs["data"].shape
    with autograd.record():
        x4 = arrs["data"].reshape((n, c, 1, w))
        w4 = arrs["weight"].reshape(arrs["weight"].shape[:2] + (1, conv["kernel"]))
        z = mx.nd.Convolution(
            x4, w4, arrs["bias"], kernel=(1, conv["kernel"]), stride=(1, conv["stride"]),
            pad=(0, conv["pad"]), dilate=(1, conv["dilate"]), num_group=conv["num_group"],
            num_filter=conv["num_filter"], no_bias=arrs["bias"] is None)
        z = mx.nd.BatchNorm(z, arrs["gamma"], arrs["beta"], arrs["running_mean"],
                            arrs["running_var"], fix_gamma=False, eps=1e-5, momentum=0.9,
                            use_global_stats=use_global_stats)
        y = mx.nd.relu(z) if relu else z
        y = y.reshape((n, conv["num_filter"], -1))
    y.backward(mx.nd.array(dy, dtype=y.dtype))
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_training_step_matches_reference_and_stock(case, dtype, impl):
    inp, conv = conv_inputs(case, dtype)
    ref_y, dy, grads, rm, rv = _reference(inp, conv)
    fused = _nd(inp)
    y = _fused(impl, fused, conv, dy)
    _assert_step(fused, y, ref_y, grads, rm, rv, dtype)

    stock = _nd(inp)
    ys = _stock(stock, conv, dy)
    _assert_step(stock, ys, ref_y, grads, rm, rv, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_bn_without_relu(case, dtype, impl):
    """relu=False (ConvBN1D): conv + batchnorm alone, in training and inference."""
    inp, conv = conv_inputs(case, dtype, seed=11)
    ref_y, dy, grads, rm, rv = _reference(inp, conv, relu=False)
    assert (ref_y < 0).any()
    fused = _nd(inp)
    y = _fused(impl, fused, conv, dy, relu=False)
    _assert_step(fused, y, ref_y, grads, rm, rv, dtype)
    stock = _nd(inp)
    _assert_step(stock, _stock(stock, conv, dy, relu=False), ref_y, grads, rm, rv, dtype)
    ref_inf = _reference(inp, conv, is_train=False, relu=False)[0]
    arrs = _nd(inp)
    y = _op(impl)(arrs["data"], arrs["weight"], arrs["bias"], arrs["gamma"],
                                arrs["beta"], arrs["running_mean"], arrs["running_var"],
                                relu=False, **conv)
    assert_close(y.asnumpy(), ref_inf, dtype, "inference output without relu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES[:5])
def test_use_global_stats_training(case, dtype, impl):
    inp, conv = conv_inputs(case, dtype, seed=3)
    ref_y, dy, grads, rm, rv = _reference(inp, conv, use_global_stats=True)
    fused = _nd(inp)
    y = _fused(impl, fused, conv, dy, use_global_stats=True)
    _assert_step(fused, y, ref_y, grads, rm, rv, dtype)
    # use_global_stats never touches the running statistics.
    np.testing.assert_array_equal(fused["running_mean"].asnumpy(), inp["running_mean"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_inference_uses_running_stats(case, dtype, impl):
    inp, conv = conv_inputs(case, dtype, seed=4)
    ref_y, _, _, _, _ = _reference(inp, conv, is_train=False)
    arrs = _nd(inp)
    y = _op(impl)(arrs["data"], arrs["weight"], arrs["bias"], arrs["gamma"],
                                arrs["beta"], arrs["running_mean"], arrs["running_var"], **conv)
    assert_close(y.asnumpy(), ref_y, dtype, "inference output")
    np.testing.assert_array_equal(arrs["running_var"].asnumpy(), inp["running_var"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_in_predict_mode_uses_running_stats(dtype, impl):
    """autograd.record(train_mode=False): the forward folds BN; backward must still work."""
    inp, conv = conv_inputs(CONV_CASES[0].values[0], dtype, seed=5)
    ref_y, dy, grads, rm, rv = _reference(inp, conv, is_train=False)
    fused = _nd(inp)
    y = _fused(impl, fused, conv, dy, train_mode=False)
    _assert_step(fused, y, ref_y, grads, rm, rv, dtype)


def test_grad_req_add_accumulates_and_null_skips(impl):
    case = CONV_CASES[2].values[0]
    inp, conv = conv_inputs(case, np.float64, seed=6)
    _, dy, grads, _, _ = _reference(inp, conv)
    arrs = _nd(inp, grad_req="add")
    arrs["data"].attach_grad("null")
    for k in GRAD_NAMES[1:]:
        arrs[k].grad[:] = 1.0
    for _ in range(2):
        # Reset the running statistics so both steps see the same batch normalization.
        arrs["running_mean"][:] = inp["running_mean"]
        arrs["running_var"][:] = inp["running_var"]
        _fused(impl, arrs, conv, dy)
    for k in GRAD_NAMES[1:]:
        assert_close(arrs[k].grad.asnumpy(), 1.0 + 2 * grads[k], np.float64, f"{k} grad (add)")
    assert arrs["data"].grad is None


def test_second_backward_with_retain_graph(impl):
    inp, conv = conv_inputs(CONV_CASES[0].values[0], np.float64, seed=12)
    _, dy, grads, _, _ = _reference(inp, conv)
    arrs = _nd(inp)
    with autograd.record():
        y = _op(impl)(arrs["data"], arrs["weight"], arrs["bias"], arrs["gamma"],
                                    arrs["beta"], arrs["running_mean"], arrs["running_var"],
                                    **conv)
    y.backward(mx.nd.array(dy, dtype=y.dtype), retain_graph=True)
    y.backward(mx.nd.array(dy, dtype=y.dtype))
    for k in GRAD_NAMES:
        assert_close(arrs[k].grad.asnumpy(), grads[k], np.float64, f"{k} after 2nd backward")


def _conv_symbol(impl, conv, no_bias):
    names = ["data", "weight"] + ([] if no_bias else ["bias"]) + ["gamma", "beta"]
    v = {n: mx.sym.var(n) for n in names + ["running_mean", "running_var"]}
    return _op(impl)(v["data"], v["weight"], None if no_bias else v["bias"],
                                   v["gamma"], v["beta"], v["running_mean"], v["running_var"],
                                   name="fused", **conv), names


@pytest.mark.parametrize("use_global_stats", [False, True])
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[3], CONV_CASES[4], CONV_CASES[5],
                                  CONV_CASES[7], CONV_CASES[8]])
def test_numeric_gradient_float64(case, use_global_stats, impl):
    # Small instance of the case, re-drawn until no pre-activation sits near ReLU's kink,
    # where finite differences are meaningless.
    n, cin, _, cout, k, s, p, d, g, bias = case
    small = (2, cin, 2 * (k - 1) * d + 5, cout, k, s, p, d, g, bias)
    for seed in range(100):
        inp, conv = conv_inputs(small, np.float64, seed=seed)
        f64 = inp
        _, cache, _, _ = R.conv1d_bn_relu_forward(
            f64["data"], f64["weight"], f64["bias"], f64["gamma"], f64["beta"],
            f64["running_mean"], f64["running_var"], s, p, d, g,
            use_global_stats=use_global_stats)
        if np.abs(cache["pre"]).min() > 2e-2:
            break
    else:
        pytest.fail("could not draw inputs away from the relu kink")
    conv["use_global_stats"] = use_global_stats
    sym, names = _conv_symbol(impl, conv, not bias)
    location = {nm: inp[nm] for nm in names}
    aux = {"running_mean": inp["running_mean"], "running_var": inp["running_var"]}
    check_numeric_gradient(sym, location, aux_states=aux, numeric_eps=1e-6, rtol=1e-4,
                           atol=1e-6, dtype=np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (17,), (2, 3, 1025), (4, 64, 97)])
def test_add_relu_matches_reference_and_stock(shape, dtype, impl):
    rng = np.random.default_rng(7)
    a, b = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    ref = R.add_relu_forward(a.astype(np.float64), b.astype(np.float64))
    dy = away_from_kink(rng.standard_normal(shape), a.astype(np.float64) + b)
    ga, gb = R.add_relu_backward(dy, ref)
    for f in (functools.partial(fusedres.add_relu, use_native=impl),
              lambda x, y: mx.nd.relu(x + y)):
        xa, xb = mx.nd.array(a, dtype=dtype), mx.nd.array(b, dtype=dtype)
        xa.attach_grad()
        xb.attach_grad()
        with autograd.record():
            y = f(xa, xb)
        y.backward(mx.nd.array(dy, dtype=dtype))
        assert_close(y.asnumpy(), ref, dtype, "add_relu output")
        assert_close(xa.grad.asnumpy(), ga, dtype, "lhs gradient")
        assert_close(xb.grad.asnumpy(), gb, dtype, "rhs gradient")


def test_add_relu_req_add_and_null(impl):
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((3, 5, 7)), rng.standard_normal((3, 5, 7))
    xa, xb = mx.nd.array(a, dtype=np.float64), mx.nd.array(b, dtype=np.float64)
    xa.attach_grad("add")
    xb.attach_grad("null")
    for _ in range(3):
        with autograd.record():
            y = fusedres.add_relu(xa, xb, use_native=impl)
        y.backward()
    expected = 3 * (a + b > 0)
    np.testing.assert_allclose(xa.grad.asnumpy(), expected, rtol=0, atol=0)
    assert xb.grad is None


def test_add_relu_numeric_gradient_float64(impl):
    rng = np.random.default_rng(9)
    a = rng.standard_normal((2, 3, 11))
    b = rng.standard_normal((2, 3, 11))
    b += np.where(np.abs(a + b) < 0.05, 0.2, 0)  # keep away from the kink
    sym = fusedres.add_relu(mx.sym.var("lhs"), mx.sym.var("rhs"), use_native=impl)
    check_numeric_gradient(sym, {"lhs": a, "rhs": b}, numeric_eps=1e-6, rtol=1e-5,
                           atol=1e-7, dtype=np.float64)


def test_tolerance_table_is_strict_enough():
    # The float64 path must agree with the float64 reference to near machine precision.
    assert TOL["impl"][np.dtype(np.float64)] <= 1e-8
