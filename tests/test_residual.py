"""Residual blocks: ResidualBlock1D (the seed's RES_CNN1D), BasicBlock1D, SkipConnection."""
import mxnet as mx
import numpy as np
import pytest
from helpers import assert_close
from mxnet import autograd, gluon
from mxnet.gluon import nn

from fusedres.nn import (AddReLU, BasicBlock1D, ConvBN1D, ConvBNReLU1D, ResidualBlock1D,
                         SkipConnection)

# Every test here runs on both implementations (conftest.py: impl_env).
pytestmark = pytest.mark.usefixtures("impl_env")


class _StockResidual(gluon.HybridBlock):
    """The same computation from stock blocks (channel counts off multiples of 8, where the
    stock Conv1D+BatchNorm backward does not crash)."""

    def __init__(self, channels, k, strides, chain, in_channels, projection, **kw):
        super().__init__(**kw)
        pad = (k - 1) // 2
        with self.name_scope():
            self.body = nn.HybridSequential()
            for i in range(chain):
                self.body.add(nn.Conv1D(channels, k, strides=strides if i == 0 else 1,
                                        padding=pad), nn.BatchNorm())
                if i < chain - 1:
                    self.body.add(nn.Activation("relu"))
            self.shortcut = None
            if projection:
                self.shortcut = nn.HybridSequential()
                self.shortcut.add(nn.Conv1D(channels, 1, strides=strides, use_bias=False),
                                  nn.BatchNorm())

    def hybrid_forward(self, F, x):
        skip = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(self.body(x) + skip)


def _fused_params_in_stock_order(fused):
    """ConvBN(ReLU)1D params in the order stock Conv1D, BatchNorm params come in."""
    out = []
    blocks = list(fused.body) + ([fused.shortcut] if fused.shortcut is not None else [])
    for b in blocks:
        out += [b.weight] + ([b.bias] if b.bias is not None else []) + [
            b.gamma, b.beta, b.running_mean, b.running_var]
    return out


@pytest.mark.parametrize("strides,chain,cin", [(1, 1, 6), (2, 3, 5), (1, 2, 3)])
def test_residual_block_matches_stock_composition(strides, chain, cin):
    fused = ResidualBlock1D(6, 3, strides=strides, chain_length=chain, in_channels=cin)
    assert (fused.shortcut is not None) == (strides > 1 or cin != 6)
    stock = _StockResidual(6, 3, strides, chain, cin, fused.shortcut is not None)
    x = mx.nd.random.normal(shape=(4, cin, 19))
    for net in (fused, stock):
        net.initialize(mx.init.Xavier())
        net(x)
    rng = np.random.default_rng(0)
    sp = [p for p in stock.collect_params().values()]
    fp = _fused_params_in_stock_order(fused)
    assert [p.shape for p in sp] == [p.shape for p in fp]
    for s, f in zip(sp, fp):
        v = mx.nd.array(rng.uniform(0.5, 1.5, s.shape) if s.name.endswith(("var", "gamma"))
                        else rng.standard_normal(s.shape) * 0.3)
        s.set_data(v)
        f.set_data(v)
    outs = []
    for net in (stock, fused):
        net.hybridize()
        with autograd.record():
            y = net(x)
        y.backward(mx.nd.ones_like(y))
        outs.append((y.asnumpy(), net))
    assert_close(outs[1][0], outs[0][0], np.float32, "output")
    for s, f in zip(sp, fp):
        if s.grad_req != "null":
            assert_close(f.grad().asnumpy(), s.grad().asnumpy(), np.float32, s.name)
        else:
            assert_close(f.data().asnumpy(), s.data().asnumpy(), np.float32, s.name)
    assert outs[1][0].shape == (4, 6, -(-19 // strides))


def test_residual_block_structure():
    blk = ResidualBlock1D(8, 5, chain_length=3, in_channels=8)
    assert [type(b) for b in blk.body] == [ConvBNReLU1D, ConvBNReLU1D, ConvBN1D]
    assert blk.shortcut is None and isinstance(blk.join, AddReLU)
    assert blk.body[0]._kwargs["pad"] == 2


def test_residual_block_refuses_impossible_skips():
    with pytest.raises(ValueError, match=r"projection=False but the body changes the shape"):
        ResidualBlock1D(10, 3, strides=2, projection=False)
    with pytest.raises(ValueError, match=r"projection=False"):
        ResidualBlock1D(10, 3, in_channels=4, projection=False)
    with pytest.raises(ValueError, match=r"no 'same' padding"):
        ResidualBlock1D(10, 4)
    blk = ResidualBlock1D(10, 3)
    blk.initialize()
    with pytest.raises(ValueError, match=r"input has 4 channels but the block outputs 10.*"
                                         r"in_channels=4"):
        blk(mx.nd.ones((2, 4, 12)))


def test_residual_block_infers_identity_when_channels_match():
    blk = ResidualBlock1D(4, 3, chain_length=2)
    blk.initialize()
    x = mx.nd.random.normal(shape=(2, 4, 12))
    assert blk(x).shape == (2, 4, 12) and blk.shortcut is None


def test_basic_block_like_gluoncv():
    blk = BasicBlock1D(16, 2, downsample=True, in_channels=8)
    blk.initialize()
    y = blk(mx.nd.random.normal(shape=(2, 8, 20)))
    assert y.shape == (2, 16, 10)
    assert blk.downsample is blk.shortcut and len(blk.body) == 2
    assert all(b.bias is None for b in blk.body)
    with pytest.raises(ValueError, match=r"projection=False"):
        BasicBlock1D(16, 2, downsample=False)


@pytest.mark.parametrize("mode,activation", [("add", "relu"), ("add", None),
                                             ("concat", "relu"), ("concat", None)])
def test_skip_connection(mode, activation):
    inner = ConvBNReLU1D(6, 3, padding=1, in_channels=6)
    skip = SkipConnection(inner, mode=mode, activation=activation)
    skip.initialize()
    x = mx.nd.random.normal(shape=(2, 6, 9))
    y = inner(x)
    expect = y + x if mode == "add" else mx.nd.concat(y, x, dim=1)
    if activation == "relu":
        expect = mx.nd.relu(expect)
    assert_close(skip(x).asnumpy(), expect.asnumpy(), np.float32, "skip")
    skip.hybridize()
    assert_close(skip(x).asnumpy(), expect.asnumpy(), np.float32, "skip hybridized")
    assert (skip.join is not None) == (mode == "add" and activation == "relu")


def test_skip_connection_errors():
    with pytest.raises(ValueError, match=r"mode must be 'add' or 'concat'"):
        SkipConnection(nn.Dense(2), mode="mul")
    with pytest.raises(ValueError, match=r"activation must be 'relu' or None"):
        SkipConnection(nn.Dense(2), activation="tanh")
    skip = SkipConnection(ConvBNReLU1D(4, 3), mode="add")
    skip.initialize()
    with pytest.raises(ValueError, match=r"rhs must have the same shape as lhs"):
        skip(mx.nd.ones((2, 6, 9)))


def test_residual_block_inside_hybridized_parent():
    net = nn.HybridSequential()
    net.add(ConvBNReLU1D(8, 3, padding=1), ResidualBlock1D(8, 3), ResidualBlock1D(8, 3,
                                                                                    strides=2))
    net.initialize()
    x = mx.nd.random.normal(shape=(2, 8, 16))
    want = net(x).asnumpy()
    net.hybridize()
    assert_close(net(x).asnumpy(), want, np.float32, "hybridized parent")


def test_blocks_take_numpy_ints():
    blk = ConvBNReLU1D(np.int64(8), np.int32(3), padding=np.int64(1))
    blk.initialize()
    assert blk(mx.nd.ones((1, 4, 9))).shape == (1, 8, 9)


def test_use_native_reaches_every_fused_block_inside(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSEDRES_NATIVE", raising=False)  # (it would override use_native=True)
    for use_native, want in ((True, "_fusedres_conv1d_bn_relu"), (False, "Custom")):
        blk = ResidualBlock1D(8, 3, strides=2, chain_length=2, in_channels=4,
                              use_native=use_native)
        skip = SkipConnection(ConvBN1D(4, 3, padding=1, in_channels=4, use_native=use_native),
                              use_native=use_native)
        for b, x in ((blk, mx.nd.ones((2, 4, 9))), (skip, mx.nd.ones((2, 4, 9)))):
            b.initialize()
            b.hybridize()
            b(x)
            prefix = str(tmp_path / f"{b.name}-{use_native}")
            b.export(prefix)
            graph = open(prefix + "-symbol.json").read()
            other = "Custom" if want != "Custom" else "_fusedres_conv1d_bn_relu"
            assert want in graph and other not in graph, (use_native, b.name)
