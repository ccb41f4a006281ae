"""The configuration matrix: the fused blocks inside models, next to MKLDNN operators in both
directions, in every way a model is run, against the same model built from stock blocks.

Cells: implementation (the `impl` fixture: the MXNet operators, the CustomOps) x model x mode
(imperative, hybridize(), hybridize(static_alloc=True, static_shape=True), exported and
re-imported SymbolBlock, mx.mod.Module) x grad_req ('write', or 'add' on every parameter and on
the input, over two steps) x engine (the threaded engine here; NaiveEngine in a subprocess,
test_naive_engine). Each cell trains FUSEDRES_MATRIX_SEEDS fresh models on fresh inputs (default
20, enough for the intermittent errors of the old design to show; all cells take about a
minute on 2 cores) and checks the output, the input's and every parameter's
gradient, and every running statistic against the oracle: the same model made of stock Gluon
blocks (Conv1D + BatchNorm + Activation for a fused conv, relu(a + b) for the join) in float64,
where MXNet runs its own, non-MKLDNN CPU operators (the fused ops themselves are checked against
the numpy reference in test_ops.py). The tested models run in float32, so their stock
neighbours run on MKLDNN and hand the fused ops MKLDNN-layout arrays, forward and backward.

The models (N, C, W = 4, 16, 20; channel counts that are multiples of 8, where MKLDNN picks
blocked layouts):
  conv_gap         Conv1D -> ConvBNReLU1D -> GlobalAvgPool1D -> Dense
  bn_act_pool      BatchNorm -> Activation -> (ConvBN1D, identity) -> AddReLU -> MaxPool1D
                   -> Flatten -> Dense: a residual fan-out after MKLDNN ops
  residual_concat  ConvBNReLU1D on the data -> (ConvBN1D, identity) -> AddReLU ->
                   concat(., Conv1D(.)) -> ConvBNReLU1D -> GlobalMaxPool1D -> Dense
"""
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd
from mxnet.gluon import HybridBlock, SymbolBlock, nn

from helpers import TOL

from fusedres.nn import AddReLU, ConvBN1D, ConvBNReLU1D

SEEDS = int(os.environ.get("FUSEDRES_MATRIX_SEEDS", "20"))
SHAPE = (4, 16, 20)
ENGINE = os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice")
MODES = ["imperative", "hybridize", "static", "export", "module"]


class _StockConvBN(HybridBlock):
    """The stock blocks a fused conv replaces: Conv1D -> BatchNorm [-> relu]."""

    def __init__(self, channels, kernel, padding, in_channels, relu, **kw):
        super().__init__(**kw)
        self._relu = relu
        with self.name_scope():
            self.conv = nn.Conv1D(channels, kernel, padding=padding, in_channels=in_channels)
            self.bn = nn.BatchNorm(in_channels=channels)

    def hybrid_forward(self, F, x):
        y = self.bn(self.conv(x))
        return F.relu(y) if self._relu else y


def _conv(fused, use_native, channels, kernel, padding, in_channels, relu=True):
    if fused:
        cls = ConvBNReLU1D if relu else ConvBN1D
        return cls(channels, kernel, padding=padding, in_channels=in_channels,
                   use_native=use_native)
    return _StockConvBN(channels, kernel, padding, in_channels, relu)


class _Join(HybridBlock):
    def __init__(self, fused, use_native, **kw):
        super().__init__(**kw)
        self._fused = fused
        with self.name_scope():
            self.op = AddReLU(use_native=use_native) if fused else None

    def hybrid_forward(self, F, a, b):
        return self.op(a, b) if self._fused else F.relu(a + b)


class ConvGap(HybridBlock):
    def __init__(self, fused, use_native, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.stem = nn.Conv1D(16, 3, padding=1, in_channels=16)
            self.f1 = _conv(fused, use_native, 16, 3, 1, 16)
            self.pool = nn.GlobalAvgPool1D()
            self.fc = nn.Dense(3, in_units=16)

    def hybrid_forward(self, F, x):
        return self.fc(self.pool(self.f1(self.stem(x))))


class BnActPool(HybridBlock):
    def __init__(self, fused, use_native, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.bn = nn.BatchNorm(in_channels=16)
            self.act = nn.Activation("relu")
            self.f1 = _conv(fused, use_native, 16, 3, 1, 16, relu=False)
            self.join = _Join(fused, use_native)
            self.pool = nn.MaxPool1D(2)
            self.flat = nn.Flatten()
            self.fc = nn.Dense(3, in_units=16 * 10)

    def hybrid_forward(self, F, x):
        h = self.act(self.bn(x))
        return self.fc(self.flat(self.pool(self.join(self.f1(h), h))))


class ResidualConcat(HybridBlock):
    def __init__(self, fused, use_native, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.f1 = _conv(fused, use_native, 16, 3, 1, 16)
            self.f2 = _conv(fused, use_native, 16, 3, 1, 16, relu=False)
            self.join = _Join(fused, use_native)
            self.side = nn.Conv1D(8, 1, in_channels=16)
            self.f3 = _conv(fused, use_native, 8, 3, 1, 24)
            self.pool = nn.GlobalMaxPool1D()
            self.fc = nn.Dense(3, in_units=8)

    def hybrid_forward(self, F, x):
        h = self.f1(x)
        r = self.join(self.f2(h), h)
        c = F.concat(r, self.side(r), dim=1)
        return self.fc(self.pool(self.f3(c)))


MODELS = {"conv_gap": ConvGap, "bn_act_pool": BnActPool, "residual_concat": ResidualConcat}
# The fused blocks of each model, by attribute name (their stock stand-ins have the same name).
FUSED_SLOTS = {"conv_gap": ["f1"], "bn_act_pool": ["f1"], "residual_concat": ["f1", "f2", "f3"]}


def _param_pairs(model_name, fused, stock):
    """(fused Parameter, stock Parameter) for every parameter of the model."""
    pairs = []
    for slot in FUSED_SLOTS[model_name]:
        f, s = getattr(fused, slot), getattr(stock, slot)
        for name, (blk, attr) in dict(weight=(s.conv, "weight"), bias=(s.conv, "bias"),
                                      gamma=(s.bn, "gamma"), beta=(s.bn, "beta"),
                                      running_mean=(s.bn, "running_mean"),
                                      running_var=(s.bn, "running_var")).items():
            pairs.append((getattr(f, name), getattr(blk, attr)))
    for child in fused._children:
        if child in FUSED_SLOTS[model_name] or child == "join":
            continue
        for name, p in getattr(fused, child).params.items():
            suffix = name[len(getattr(fused, child).prefix):]
            pairs.append((p, getattr(stock, child).params[getattr(stock, child).prefix + suffix]))
    return pairs


def _build(model_name, use_native, seed):
    """The fused float32 model, and its stock float64 oracle with the same parameters."""
    mx.random.seed(seed)
    fused = MODELS[model_name](True, use_native, prefix="m_")
    fused.initialize(mx.init.Normal(0.3))
    stock = MODELS[model_name](False, None, prefix="m_")
    stock.initialize()
    stock.cast("float64")
    rng = np.random.default_rng(seed)
    for pf, ps in _param_pairs(model_name, fused, stock):
        if "running_var" in pf.name:
            value = rng.uniform(0.5, 2.0, pf.shape)
        elif "running_mean" in pf.name:
            value = rng.standard_normal(pf.shape) * 0.1
        else:
            value = pf.data().asnumpy()
        pf.set_data(mx.nd.array(value, dtype="float32"))
        ps.set_data(mx.nd.array(value, dtype="float64"))
    return fused, stock


def _oracle(stock, x, dy, steps):
    """Output, input gradient, parameter gradients (summed over steps) and running stats."""
    xs = mx.nd.array(x, dtype="float64")
    xs.attach_grad("add")
    for p in stock.collect_params().values():
        if p.grad_req != "null":
            p.grad_req = "add"
            p.zero_grad()
    for _ in range(steps):
        with autograd.record():
            y = stock(xs)
        y.backward(mx.nd.array(dy, dtype="float64"))
    return y.asnumpy(), xs.grad.asnumpy()


def _check(what, got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1.0)
    assert err <= TOL["impl"][np.dtype(np.float32)], f"{what}: relative error {err:.3g}"


def _run_gluon(net, mode, x, dy, grad_req, steps, tmp_path):
    """Trains net (float32) for steps on x; returns (output, input grad, params by name)."""
    if mode == "hybridize":
        net.hybridize()
    elif mode == "static":
        net.hybridize(static_alloc=True, static_shape=True)
    elif mode == "export":
        net.hybridize()
        net(mx.nd.array(x))  # builds the graph (inference: running stats stay as set)
        prefix = str(tmp_path / "model")
        net.export(prefix)
        net = SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")
        net.hybridize()
    params = net.collect_params()
    for p in params.values():
        if p.grad_req != "null":
            p.grad_req = grad_req
    xa = mx.nd.array(x)
    xa.attach_grad(grad_req)
    for _ in range(steps):
        with autograd.record():
            y = net(xa)
        y.backward(mx.nd.array(dy))
    mx.nd.waitall()
    grads = {n: p.grad().asnumpy() for n, p in params.items() if p.grad_req != "null"}
    data = {n: p.data().asnumpy() for n, p in params.items()}
    return y.asnumpy(), xa.grad.asnumpy(), grads, data


def _run_module(net, x, dy, grad_req, steps, tmp_path):
    net.hybridize()
    net(mx.nd.array(x))
    prefix = str(tmp_path / "model")
    net.export(prefix)
    sym, arg, aux = mx.model.load_checkpoint(prefix, 0)
    mod = mx.mod.Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", x.shape)], for_training=True, inputs_need_grad=True,
             grad_req=grad_req)
    mod.set_params(arg, aux)
    batch = mx.io.DataBatch([mx.nd.array(x)])
    for _ in range(steps):
        mod.forward(batch, is_train=True)
        mod.backward([mx.nd.array(dy)])
    y = mod.get_outputs()[0].asnumpy()
    mx.nd.waitall()
    ex = mod._exec_group.execs[0]  # (get_params() returns the values set until update())
    grads = {n: g.asnumpy() for n, g in ex.grad_dict.items() if n != "data" and g is not None}
    data = {n: a.asnumpy() for n, a in {**ex.arg_dict, **ex.aux_dict}.items()}
    return y, mod.get_input_grads()[0].asnumpy(), grads, data


def _cell(model_name, use_native, mode, grad_req, seed, tmp_path):
    fused, stock = _build(model_name, use_native, seed)
    rng = np.random.default_rng(1000 + seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    dy = rng.standard_normal((SHAPE[0], 3)).astype(np.float32)
    steps = 2 if grad_req == "add" else 1
    names = {pf.name: ps for pf, ps in _param_pairs(model_name, fused, stock)}
    if mode == "module":
        y, gx, grads, data = _run_module(fused, x, dy, grad_req, steps, tmp_path)
    else:
        y, gx, grads, data = _run_gluon(fused, mode, x, dy, grad_req, steps, tmp_path)
    y_ref, gx_ref = _oracle(stock, x, dy, steps)
    where = f"{model_name}/{mode}/{grad_req}/seed {seed}"
    _check(f"{where}: output", y, y_ref)
    _check(f"{where}: input gradient", gx, gx_ref)
    assert set(grads) == {n for n, p in names.items() if p.grad_req != "null"}, where
    for name, g in grads.items():
        _check(f"{where}: {name} gradient", g, names[name].grad().asnumpy())
    for name, ps in names.items():
        if "running" in name:
            _check(f"{where}: {name}", data[name], ps.data().asnumpy())


@pytest.mark.filterwarnings("ignore:Cannot decide type")  # SymbolBlock.imports, stock MXNet
@pytest.mark.parametrize("grad_req", ["write", "add"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_cell(model_name, mode, grad_req, impl, tmp_path):
    for seed in range(SEEDS):
        _cell(model_name, impl, mode, grad_req, seed, tmp_path)


@pytest.mark.skipif(ENGINE == "NaiveEngine", reason="this is the NaiveEngine run itself")
def test_naive_engine():
    """Every cell once more under NaiveEngine (an engine is chosen per process)."""
    env = dict(os.environ, MXNET_ENGINE_TYPE="NaiveEngine", FUSEDRES_MATRIX_SEEDS=str(SEEDS))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__, "-k", "test_cell"], capture_output=True, text=True,
                         env=env, timeout=3000, cwd=os.path.dirname(__file__))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "failed" not in res.stdout, res.stdout[-2000:]
