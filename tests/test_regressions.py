"""The recipes of the defects the one-contract redesign fixed, run as their reports ran them:
40 fresh models each, under both implementations (the `impl` fixture) and every way of
running a block. Each failed on the design before it (see the issue's recipes)."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from fusedres.nn import AddReLU, ConvBNReLU1D

ITERATIONS = 40
MODES = [None, {}, {"static_alloc": True, "static_shape": True}]
MODE_IDS = ["imperative", "hybridize", "static_alloc"]


class _Head(gluon.HybridBlock):
    """fused op -> global pooling -> Dense(3): the README's example head."""

    def __init__(self, fused, pool, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.fused = fused
            self.pool = gluon.nn.GlobalAvgPool1D() if pool == "avg" else gluon.nn.GlobalMaxPool1D()
            self.fc = gluon.nn.Dense(3, in_units=16)

    def hybrid_forward(self, F, a, b=None):
        y = self.fused(a, b) if b is not None else self.fused(a)
        return self.fc(self.pool(y))


def _pool_grad(y, g, pool):
    """Gradient reaching y from pool(y) with head gradient g (N, C)."""
    if pool == "avg":
        return np.repeat(g[:, :, None] / y.shape[2], y.shape[2], axis=2)
    out = np.zeros_like(y)
    idx = y.argmax(axis=2)
    for n in range(y.shape[0]):
        for c in range(y.shape[1]):
            out[n, c, idx[n, c]] = g[n, c]
    return out


@pytest.mark.parametrize("flags", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_add_relu_before_global_pooling(pool, flags, impl):
    """Defect 1: behind a global pooling head the CustomOp read freed memory (MXNet's
    temporary copy of the pooling gradient), 40-65% of fresh models; then 1e10 to inf."""
    for it in range(ITERATIONS):
        net = _Head(AddReLU(use_native=impl), pool)
        net.initialize()
        if flags is not None:
            net.hybridize(**flags)
        a, b = mx.nd.random.normal(shape=(4, 16, 64)), mx.nd.random.normal(shape=(4, 16, 64))
        a.attach_grad()
        with autograd.record():
            out = net(a, b)
        out.backward()
        s = a.asnumpy() + b.asnumpy()
        g = np.ones((4, 3)) @ net.fc.weight.data().asnumpy()
        ref = (s > 0) * _pool_grad(np.maximum(s, 0), g, pool)
        err = np.abs(a.grad.asnumpy() - ref).max()
        assert err < 1e-5, f"iteration {it}: input gradient off by {err:.3g}"


@pytest.mark.parametrize("flags", MODES, ids=MODE_IDS)
def test_conv_before_global_pooling_with_plain_attach_grad(flags, impl):
    """Defects 1 and 2: a plain attach_grad() input must be written, not accumulated (the
    old design guessed an input's grad_req from a table keyed by a reused address, and 1 in
    20 inputs took the CustomOp path of defect 1)."""
    for it in range(ITERATIONS):
        mx.random.seed(it)
        net = _Head(ConvBNReLU1D(16, 3, padding=1, in_channels=16, use_native=impl), "avg")
        net.initialize()
        if flags is not None:
            net.hybridize(**flags)
        x = mx.nd.random.normal(shape=(4, 16, 64))
        x.attach_grad()
        grads = []
        for _ in range(2):  # the same step twice: 'write' gives the same gradient twice
            with autograd.record():
                out = net(x)
            out.backward()
            grads.append(x.grad.asnumpy().copy())
        assert np.isfinite(grads[0]).all() and np.abs(grads[0]).max() < 1e3, f"iteration {it}"
        np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6,
                                   err_msg=f"iteration {it}: gradient not overwritten")


@pytest.mark.parametrize("flags", MODES[1:], ids=MODE_IDS[1:])
def test_input_gradient_accumulates_inside_a_hybridized_parent(flags, impl):
    """Defect 3: fused blocks inside a hybridized HybridSequential, x.attach_grad('add'),
    two backward passes: x.grad must hold both (it held only the last)."""
    for it in range(ITERATIONS // 4):
        mx.random.seed(it)
        net = gluon.nn.HybridSequential()
        net.add(ConvBNReLU1D(8, 3, padding=1, in_channels=4, use_native=impl),
                ConvBNReLU1D(8, 3, padding=1, in_channels=8, use_native=impl))
        net.initialize()
        net.hybridize(**flags)
        x = mx.nd.random.normal(shape=(2, 4, 17))
        x.attach_grad("write")
        with autograd.record():
            y = net(x)
        y.backward()
        once = x.grad.asnumpy().copy()
        x.attach_grad("add")
        for _ in range(2):
            with autograd.record():
                y = net(x)
            y.backward()
        np.testing.assert_allclose(x.grad.asnumpy(), 2 * once, rtol=1e-4, atol=1e-6,
                                   err_msg=f"iteration {it}")
        for p in net.collect_params().values():
            assert p.grad_req in ("write", "null")
