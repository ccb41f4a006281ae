"""Numbers in, numbers out: NaN and infinities propagate as IEEE arithmetic, MXNet's stock
blocks and the numpy reference say, in both implementations (the `impl` fixture). A NaN that
disappears hides a diverging model."""
import functools

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from mxnet.gluon import nn

import fusedres
from fusedres import reference as R
from fusedres.nn import AddReLU, ConvBNReLU1D


def assert_same_numbers(got, want, what, rtol=1e-5):
    """Same NaN and ±inf positions, and close finite values."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=f"{what}: +inf")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{what}: -inf")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=rtol,
                               err_msg=f"{what}: finite values")


def test_add_relu_keeps_nan_like_relu_of_the_sum(impl):
    a = mx.nd.array([[np.nan, -1.0, 2.0, np.inf, -np.inf, 0.5]])
    b = mx.nd.array([[0.0, 0.5, np.nan, -np.inf, 1.0, -1.0]])
    for x in (a, b):
        x.attach_grad()
    dy = mx.nd.array([[1.0, 1.0, 1.0, 1.0, 1.0, np.nan]])
    with autograd.record():
        y = fusedres.add_relu(a, b, use_native=impl)
    y.backward(dy)
    sa, sb = a.copy(), b.copy()
    for x in (sa, sb):
        x.attach_grad()
    with autograd.record():
        ys = mx.nd.relu(sa + sb)
    ys.backward(dy)
    assert_same_numbers(y.asnumpy(), ys.asnumpy(), "forward vs F.relu(a + b)")
    assert_same_numbers(a.grad.asnumpy(), sa.grad.asnumpy(), "lhs gradient vs stock")
    assert_same_numbers(b.grad.asnumpy(), sb.grad.asnumpy(), "rhs gradient vs stock")
    with np.errstate(invalid="ignore"):
        ref = R.add_relu_forward(a.asnumpy().astype(np.float64), b.asnumpy())
    assert_same_numbers(y.asnumpy(), ref, "forward vs reference")
    assert np.isnan(y.asnumpy()[0, 0]) and np.isnan(a.grad.asnumpy()[0, 0])


def _stock_block(blk):
    """nn.Conv1D + nn.BatchNorm + relu with blk's parameters."""
    conv = nn.Conv1D(blk._channels, blk._attrs.kernel, padding=blk._attrs.pad,
                     in_channels=blk.weight.shape[1])
    bn = nn.BatchNorm(in_channels=blk._channels)
    seq = nn.HybridSequential()
    seq.add(conv, bn, nn.Activation("relu"))
    seq.initialize()
    conv.weight.set_data(blk.weight.data())
    conv.bias.set_data(blk.bias.data())
    for name in ("gamma", "beta", "running_mean", "running_var"):
        getattr(bn, name).set_data(getattr(blk, name).data())
    return seq


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_infinite_or_nan_scale_in_inference_is_not_folded_away(value, impl):
    """gamma = inf in one channel: BatchNorm computes (z - mean) * inf + beta, which is +inf,
    -inf or NaN element by element; folding inf into the conv weights must not turn it into 0
    (what the folded kernel once returned for the whole channel)."""
    blk = ConvBNReLU1D(4, 3, padding=1, in_channels=3, use_native=impl)
    blk.initialize(mx.init.Normal(0.5))
    x = mx.nd.array(np.random.default_rng(1).standard_normal((2, 3, 11)))
    blk(x)
    gamma = blk.gamma.data().asnumpy()
    gamma[1] = value
    blk.gamma.set_data(mx.nd.array(gamma))
    y = blk(x).asnumpy()
    stock = _stock_block(blk)(x).asnumpy()
    p = {n: getattr(blk, n).data().asnumpy().astype(np.float64)
         for n in ("weight", "bias", "gamma", "beta", "running_mean", "running_var")}
    ref = R.conv1d_bn_relu_forward(x.asnumpy().astype(np.float64), p["weight"], p["bias"],
                                   p["gamma"], p["beta"], p["running_mean"],
                                   p["running_var"], pad=1, is_train=False)[0]
    assert_same_numbers(y, ref, "inference vs reference")
    if not np.isnan(value):
        # (Stock Activation('relu') after an MKLDNN BatchNorm turns NaN into 0, where MXNet's
        # relu operator and the reference keep it: for NaN only the reference is the yardstick.)
        assert_same_numbers(y, stock, "inference vs stock Conv1D + BatchNorm + relu")
    assert not np.isfinite(y[:, 1]).all()


@pytest.mark.parametrize("training", [True, False])
def test_nan_and_inf_inputs_reach_outputs_and_gradients(training, impl):
    rng = np.random.default_rng(2)
    case = dict(x=rng.standard_normal((2, 3, 13)), w=rng.standard_normal((4, 3, 3)),
                b=rng.standard_normal(4), g=rng.uniform(0.5, 1.5, 4), be=rng.standard_normal(4),
                rm=rng.standard_normal(4) * 0.1, rv=rng.uniform(0.5, 2, 4))
    case["x"][0, 1, 5] = np.nan
    case["x"][1, 2, 7] = np.inf
    arrs = {k: mx.nd.array(v, dtype="float64") for k, v in case.items()}
    for k in ("x", "w", "b", "g", "be"):
        arrs[k].attach_grad()
    dy = rng.standard_normal((2, 4, 13))
    op = functools.partial(fusedres.conv1d_bn_relu, kernel=3, num_filter=4, pad=1,
                           use_native=impl)
    with autograd.record(train_mode=training):
        y = op(arrs["x"], arrs["w"], arrs["b"], arrs["g"], arrs["be"], arrs["rm"], arrs["rv"])
    y.backward(mx.nd.array(dy, dtype="float64"))
    with np.errstate(invalid="ignore", over="ignore"):
        ref_y, cache, ref_rm, _ = R.conv1d_bn_relu_forward(
            case["x"], case["w"], case["b"], case["g"], case["be"], case["rm"], case["rv"],
            pad=1, is_train=training)
        grads = R.conv1d_bn_relu_backward(dy, cache)
    assert_same_numbers(y.asnumpy(), ref_y, "output")
    for k, name in (("x", "data"), ("w", "weight"), ("b", "bias"), ("g", "gamma"),
                    ("be", "beta")):
        assert_same_numbers(arrs[k].grad.asnumpy(), grads[name], f"{name} gradient")
    assert_same_numbers(arrs["rm"].asnumpy(), ref_rm, "running_mean")
    assert np.isnan(y.asnumpy()).any() and np.isnan(arrs["w"].grad.asnumpy()).any()


def test_nan_head_gradient_reaches_the_input(impl):
    """dy = NaN where the relu is closed: MXNet's relu gives dy * 0 = NaN, not 0."""
    a = mx.nd.array([[-1.0, 1.0]])
    a.attach_grad()
    with autograd.record():
        y = AddReLU(use_native=impl)(a, mx.nd.zeros((1, 2)))
    y.backward(mx.nd.array([[np.nan, 1.0]]))
    assert np.isnan(a.grad.asnumpy()[0, 0]) and a.grad.asnumpy()[0, 1] == 1.0
