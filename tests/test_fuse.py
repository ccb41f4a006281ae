"""fusedres.fuse(net): stock models keep their outputs, gradients and running statistics."""
import mxnet as mx
import numpy as np
import pytest
from helpers import assert_close
from mxnet import autograd, gluon
from mxnet.gluon import nn

import fusedres
from fusedres.nn import ConvBN1D, ConvBNReLU1D

# Every test here runs on both implementations (conftest.py: impl_env).
pytestmark = pytest.mark.usefixtures("impl_env")

# Channel counts off multiples of 8: the stock model must train too, to be compared with.


def _stock_sequential():
    net = nn.HybridSequential()
    net.add(nn.Conv1D(6, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"),
            nn.Conv1D(7, 5, strides=2, padding=2, use_bias=False), nn.BatchNorm(),
            nn.LeakyReLU(0),
            nn.Conv1D(5, 3, activation="relu"), nn.BatchNorm(),  # relu before BN: left alone
            nn.Flatten(), nn.Dense(3))  # GlobalAvgPool1D after BatchNorm crashes stock MXNet too
    return net


class _SeedCNN1D(gluon.Block):
    """The seed question's CNN1D, with its Conv1D/BatchNorm/Activation attributes."""

    def __init__(self, channels, kernel, padding=0, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv1D(channels=channels, kernel_size=kernel, padding=padding)
            self.bn = nn.BatchNorm()
            self.ramp = nn.Activation(activation="relu")

    def forward(self, x):
        return self.ramp(self.bn(self.conv(x)))


class _Res(gluon.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv1D(5, 3, padding=1)
            self.bn = nn.BatchNorm()
            self.act = nn.Activation("relu")
            self.conv2 = nn.Conv1D(5, 3, padding=1)
            self.bn2 = nn.BatchNorm()   # joins the skip before relu: fused as ConvBN1D

    def hybrid_forward(self, F, x):
        y = self.bn2(self.conv2(self.act(self.bn(self.conv(x)))))
        return F.relu(y + x)


def _randomize(net, seed=0):
    rng = np.random.default_rng(seed)
    for p in net.collect_params().values():
        if p.name.endswith(("running_var", "gamma")):
            p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, p.shape)))
        else:
            p.set_data(mx.nd.array(rng.standard_normal(p.shape) * 0.3))


def _step(net, x):
    with autograd.record():
        y = net(x)
    y.backward(mx.nd.ones_like(y))
    grads = {n: p.grad().asnumpy() for n, p in net._collect_params_with_prefix().items()
             if p.grad_req != "null"}
    stats = {n: p.data().asnumpy() for n, p in net._collect_params_with_prefix().items()
             if p.grad_req == "null"}
    return y.asnumpy(), grads, stats, net(x).asnumpy()


def _compare(net_stock, net_fused, x, param_map):
    ys, gs, ss, inf_s = _step(net_stock, x)
    yf, gf, sf, inf_f = _step(net_fused, x)
    assert_close(yf, ys, np.float32, "training output")
    assert_close(inf_f, inf_s, np.float32, "inference output")
    assert {o for n in gf for o in param_map[n]} == set(gs)
    for n, g in gf.items():
        assert_close(g, gs[param_map[n][0]], np.float32, f"gradient {n}")
    for n, s in sf.items():
        assert_close(s, ss[param_map[n][0]], np.float32, f"running statistic {n}")


def _clone(make, x):
    a, b = make(), make()
    for net in (a, b):
        net.initialize()
        net(x)
    _randomize(a)
    b.load_dict = None
    for (_, pa), (_, pb) in zip(sorted(a._collect_params_with_prefix().items()),
                                sorted(b._collect_params_with_prefix().items())):
        pb.set_data(pa.data())
    return a, b


@pytest.mark.parametrize("hybridize", [False, True])
def test_fuse_sequential_matches_stock(hybridize):
    x = mx.nd.random.normal(shape=(4, 3, 21))
    stock, fused = _clone(_stock_sequential, x)
    if hybridize:
        stock.hybridize()
        fused.hybridize()
        fused(x)  # a cached graph exists before fusing; fuse() must drop it
    report = fusedres.fuse(fused)
    assert len(report.fused) == 2 and isinstance(fused[0], ConvBNReLU1D)
    assert isinstance(fused[1], ConvBNReLU1D) and len(fused) == 6
    assert any("own activation" in why for _, why in report.left), str(report)
    _compare(stock, fused, x, fused._fusedres_param_map)


def test_fuse_custom_blocks_with_sample():
    x = mx.nd.random.normal(shape=(2, 5, 17))

    def make():
        net = nn.Sequential()
        net.add(_SeedCNN1D(5, 3, padding=1), _Res())
        return net

    stock, fused = _clone(make, x)
    report = fusedres.fuse(fused, sample=x)
    assert [p for p, _ in report.fused] == ["0.conv", "1.conv", "1.conv2"], str(report)
    assert not report.left, str(report)
    assert isinstance(fused[0].conv, ConvBNReLU1D)
    assert isinstance(fused[1].conv2, ConvBN1D) and "as ConvBN1D" in str(report)
    _compare(stock, fused, x, fused._fusedres_param_map)


def test_fuse_without_sample_reports_custom_blocks():
    net = _SeedCNN1D(5, 3)
    net.initialize()
    report = fusedres.fuse(net)
    assert not report.fused and "pass sample=" in str(report)


def test_load_unfused_parameters(tmp_path):
    x = mx.nd.random.normal(shape=(4, 3, 21))
    stock = _stock_sequential()
    stock.initialize()
    stock(x)
    _randomize(stock, seed=3)
    stock.save_parameters(str(tmp_path / "stock.params"))
    fused = _stock_sequential()
    fused.initialize()
    fused(x)
    fusedres.fuse(fused)
    fusedres.load_unfused_parameters(fused, str(tmp_path / "stock.params"))
    assert_close(fused(x).asnumpy(), stock(x).asnumpy(), np.float32, "after loading")
    with pytest.raises(ValueError, match="has not been through fusedres.fuse"):
        fusedres.load_unfused_parameters(stock, str(tmp_path / "stock.params"))


def test_fuse_deferred_parameters_then_train():
    net = nn.HybridSequential()
    net.add(nn.Conv1D(8, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"))
    net.initialize()
    report = fusedres.fuse(net)
    assert len(report.fused) == 1
    x = mx.nd.random.normal(shape=(2, 4, 9))
    with autograd.record():
        y = net(x)
    y.backward()
    assert net[0].weight.shape == (8, 4, 3)
    assert net[0].weight.grad().abs().sum().asscalar() > 0


class _Tricky(gluon.HybridBlock):
    """Runs that must not be fused as they look: a relu block reused after the join, a conv
    output also used by a plain operator, a BatchNorm applied twice."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv1, self.bn1 = nn.Conv1D(5, 3, padding=1), nn.BatchNorm()
            self.relu = nn.Activation("relu")
            self.conv2, self.bn2 = nn.Conv1D(5, 3, padding=1), nn.BatchNorm()
            self.conv3, self.bn3 = nn.Conv1D(5, 3, padding=1), nn.BatchNorm()

    def hybrid_forward(self, F, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        y = self.bn2(z) + z
        y = self.bn3(self.conv3(y)) + self.bn3(y)
        return self.relu(y + x - 0.5)


def test_fuse_custom_keeps_what_it_cannot_prove():
    x = mx.nd.random.normal(shape=(2, 5, 13))
    net = _Tricky()
    net.initialize()
    net(x)
    _randomize(net, seed=4)
    want = net(x).asnumpy()
    report = fusedres.fuse(net, sample=x)
    assert_close(net(x).asnumpy(), want, np.float32, "after fuse")
    fused = dict(report.fused)
    assert "conv1" in fused and "as ConvBN1D" in fused["conv1"]  # the relu block stays
    left = dict(report.left)
    assert "changed the model's output" in left["conv2"]
    assert "also runs elsewhere" in left["conv3"]


def test_fuse_keeps_parameter_objects_sharing_and_multipliers(tmp_path):
    a = nn.Conv1D(4, 3, padding=1, in_channels=4)
    net = nn.HybridSequential()
    net.add(a, nn.BatchNorm(in_channels=4), nn.Activation("relu"),
            nn.Conv1D(4, 3, padding=1, in_channels=4, params=a.params),
            nn.BatchNorm(in_channels=4), nn.Activation("relu"))
    net.initialize(ctx=mx.cpu(1))
    net[1].gamma.wd_mult = 0.0
    a.weight.lr_mult = 0.1
    originals = {p.name: p for p in net.collect_params().values()}
    net.save_parameters(str(tmp_path / "stock.params"))
    fusedres.fuse(net)
    assert net[0].weight is net[1].weight is a.weight and a.weight.lr_mult == 0.1
    assert net[0].gamma is originals[net[0].gamma.name] and net[0].gamma.wd_mult == 0.0
    assert {p.name: p for p in net.collect_params().values()} == originals
    # load_unfused_parameters keeps the model's context (here cpu(1)).
    fusedres.load_unfused_parameters(net, str(tmp_path / "stock.params"))
    assert net[0].weight.list_ctx() == [mx.cpu(1)]


@pytest.mark.parametrize("native", ["0", "1"], ids=["custom-ops", "native-ops"])
def test_fuse_after_stock_mkldnn_inference(monkeypatch, native):
    """MKLDNN reorders a stock Conv1D's weight in place during inference; fused blocks that
    take over that Parameter must still read its values."""
    monkeypatch.setenv("FUSEDRES_NATIVE", native)
    net = nn.HybridSequential()
    net.add(nn.Conv1D(16, 3, padding=1, in_channels=16), nn.BatchNorm(in_channels=16),
            nn.Activation("relu"), nn.Conv1D(16, 3, padding=1, in_channels=16),
            nn.BatchNorm(in_channels=16))
    net.initialize(mx.init.Xavier())
    x = mx.nd.random.normal(shape=(8, 16, 50))
    for _ in range(3):
        want = net(x).asnumpy()
    fusedres.fuse(net)
    assert_close(net(x).asnumpy(), want, np.float32, "after fuse")


class _ActJoin(gluon.HybridBlock):
    """A hand-written BasicBlock: relu(body(x) + x) by F.Activation, and a second join whose
    sum is also returned (the add must stay)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = nn.HybridSequential()
            self.body.add(nn.Conv1D(5, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"),
                          nn.Conv1D(5, 3, padding=1), nn.BatchNorm())

    def hybrid_forward(self, F, x):
        y = F.Activation(self.body(x) + x, act_type="relu")
        s = y + x
        return F.relu(s) * 2 + s


@pytest.mark.parametrize("hybridize", [False, True])
def test_fuse_residual_joins_in_forward_code(hybridize):
    x = mx.nd.random.normal(shape=(3, 5, 19))

    def make():
        net = nn.HybridSequential()
        net.add(_Res(), _ActJoin())
        return net

    stock, fused = _clone(make, x)
    report = fusedres.fuse(fused, sample=x)
    assert [p for p, _ in report.joins] == ["0", "1"], str(report)
    assert "fused 2 residual join(s)" in str(report)
    if hybridize:
        stock.hybridize()
        fused.hybridize(static_alloc=True)
    _compare(stock, fused, x, fused._fusedres_param_map)
    if hybridize:
        graph = fused._cached_graph[1].tojson()
        assert graph.count('"op": "_fusedres_add_relu"') + graph.count(
            '"op_type": "fusedres_add_relu"') == 3
    fusedres.fuse(fused, sample=x)   # a second fuse() changes nothing more
    _compare(stock, fused, x, fused._fusedres_param_map)


def test_fuse_leaves_joins_of_blocks_sharing_parameters_outside():
    x = mx.nd.random.normal(shape=(2, 5, 11))
    net = nn.HybridSequential()
    a = _Res()
    b = _Res(params=a.collect_params())
    net.add(a, nn.Conv1D(5, 3, padding=1, params=a.conv.collect_params()), b)
    net.initialize()
    report = fusedres.fuse(net, sample=x)
    assert not report.joins, str(report)


class _BranchOnF(gluon.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv1D(5, 3, padding=1)

    def hybrid_forward(self, F, x):
        if F is mx.nd:
            return F.relu(self.conv(x) + x)
        return F.relu(self.conv(x) + x)


def test_fuse_leaves_joins_of_forward_code_that_tests_F():
    net = nn.HybridSequential()
    net.add(_BranchOnF())
    net.initialize()
    report = fusedres.fuse(net, sample=mx.nd.ones((1, 5, 8)))
    assert not report.joins, str(report)
