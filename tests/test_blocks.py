"""The Gluon blocks behave like the stock blocks they replace: same parameters, same results,
in Block/Sequential/HybridSequential, hybridized, exported and re-imported, and as symbols."""
import json
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest
from helpers import assert_close
from mxnet import autograd, gluon
from mxnet.gluon import nn

import fusedres
from fusedres import reference as R
from fusedres.nn import AddReLU, ConvBNReLU1D

# Every test here runs on both implementations (conftest.py: impl_env).
pytestmark = pytest.mark.usefixtures("impl_env")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stock_chain(channels, kernel, in_channels, **kw):
    conv_kw = dict(strides=kw.get("strides", 1), padding=kw.get("padding", 0),
                   dilation=kw.get("dilation", 1), groups=kw.get("groups", 1),
                   use_bias=kw.get("use_bias", True))
    net = nn.HybridSequential()
    net.add(nn.Conv1D(channels, kernel, in_channels=in_channels, **conv_kw),
            nn.BatchNorm(in_channels=channels), nn.Activation("relu"))
    return net


def _copy_stock_params(stock, fused):
    """Stock Conv1D + BatchNorm parameters into a ConvBNReLU1D, by name suffix."""
    for param in stock.collect_params().values():
        suffix = param.name.split("_", 1)[1]
        getattr(fused, suffix).set_data(param.data())


def _random_init(block, seed):
    rng = np.random.default_rng(seed)
    for p in block.collect_params().values():
        if p.name.endswith("running_var") or p.name.endswith("gamma"):
            p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, p.shape)))
        else:
            p.set_data(mx.nd.array(rng.standard_normal(p.shape) * 0.3))


@pytest.mark.parametrize("hybridize", [False, True])
@pytest.mark.parametrize("kw", [dict(padding=1), dict(strides=2, use_bias=False),
                                dict(dilation=2, padding=2, groups=1),
                                dict(padding=1, groups=5, channels=10),
                                dict(strides=2, padding=2, dilation=2, groups=5, channels=5)])
def test_matches_stock_gluon_blocks(kw, hybridize):
    # 7 output channels: the stock 1-D block only survives backward off multiples of 8.
    # groups=5: depthwise (with multiplier 2), which has its own CPU kernels.
    kw = dict(kw)
    channels = kw.pop("channels", 7)
    stock = _stock_chain(channels, 3, 5, **kw)
    fused = ConvBNReLU1D(channels, 3, in_channels=5, **kw)
    stock.initialize()
    fused.initialize()
    _random_init(stock, 0)
    _copy_stock_params(stock, fused)
    assert sorted(p.name.split("_", 1)[1] for p in stock.collect_params().values()) == \
        sorted(p.name.split("_", 1)[1] for p in fused.collect_params().values())
    if hybridize:
        stock.hybridize()
        fused.hybridize()
    x = mx.nd.random.normal(shape=(4, 5, 31), dtype="float32")
    dy = mx.nd.random.normal(shape=stock(x).shape)
    outs = []
    for net in (stock, fused):
        with autograd.record():
            y = net(x)
        y.backward(dy)
        outs.append((y.asnumpy(), {p.name.split("_", 1)[1]: p for p in
                                   net.collect_params().values()}))
    (ys, ps), (yf, pf) = outs
    assert_close(yf, ys, np.float32, "training output")
    for name, p in ps.items():
        if p.grad_req != "null":
            assert_close(pf[name].grad().asnumpy(), p.grad().asnumpy(), np.float32, name)
        else:
            assert_close(pf[name].data().asnumpy(), p.data().asnumpy(), np.float32, name)
    assert_close(fused(x).asnumpy(), stock(x).asnumpy(), np.float32, "inference output")


class _Residual(gluon.HybridBlock):
    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = nn.HybridSequential()
            self.body.add(ConvBNReLU1D(channels, 3, padding=1),
                          ConvBNReLU1D(channels, 5, padding=2, use_bias=False))
            self.join = AddReLU()

    def hybrid_forward(self, F, x):
        return self.join(self.body(x), x)


def _model():
    net = nn.HybridSequential(prefix="model_")
    with net.name_scope():
        net.add(ConvBNReLU1D(16, 3, padding=1), _Residual(16), ConvBNReLU1D(8, 3, strides=2))
    net.initialize(mx.init.Xavier())
    return net


@pytest.mark.parametrize("native", ["1", "0"], ids=["native-ops", "custom-ops"])
def test_imperative_hybridized_exported_agree(tmp_path, monkeypatch, native):
    monkeypatch.setenv("FUSEDRES_NATIVE", native)
    net = _model()
    x = mx.nd.random.normal(shape=(2, 4, 29))
    # One training step first, so that running statistics are not at their initial values.
    with autograd.record():
        net(x).backward()
    want = net(x).asnumpy()
    net.hybridize()
    assert_close(net(x).asnumpy(), want, np.float32, "hybridized inference")
    prefix = str(tmp_path / "model")
    net.export(prefix, epoch=0)
    np.save(tmp_path / "x.npy", x.asnumpy())
    script = textwrap.dedent(f"""
        import numpy as np, mxnet as mx
        import fusedres  # registers the ops before the graph is loaded
        net = mx.gluon.SymbolBlock.imports({prefix!r} + "-symbol.json", ["data"],
                                           {prefix!r} + "-0000.params")
        x = mx.nd.array(np.load({str(tmp_path / 'x.npy')!r}))
        np.save({str(tmp_path / 'y.npy')!r}, net(x).asnumpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    assert_close(np.load(tmp_path / "y.npy"), want, np.float32, "exported and re-imported")
    graph = json.load(open(prefix + "-symbol.json"))
    ops = {n["attrs"]["op_type"] if n["op"] == "Custom" else n["op"] for n in graph["nodes"]}
    want = {"fusedres_conv1d_bn_relu", "fusedres_add_relu"}
    assert ops & {"_" + w for w in want} == ({"_" + w for w in want} if native == "1" else set())
    assert ops & want == (set() if native == "1" else want)


def test_training_imperative_equals_hybridized():
    x = mx.nd.random.normal(shape=(3, 4, 23))
    results = []
    for hybridize in (False, True):
        mx.random.seed(1)
        net = _model()
        if hybridize:
            net.hybridize()
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
        for _ in range(2):
            with autograd.record():
                loss = (net(x) ** 2).mean()
            loss.backward()
            trainer.step(x.shape[0])
        results.append({k.split("_", 1)[1]: v.data().asnumpy()
                        for k, v in net.collect_params().items()})
    for name in results[0]:
        assert_close(results[1][name], results[0][name], np.float32, name)


class SeedCNN1D(gluon.Block):
    """The seed question's CNN1D block (a plain Block), with the fused op inside."""

    def __init__(self, channels, kernel, stride=1, padding=0, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.cbr = ConvBNReLU1D(channels, kernel, strides=stride, padding=padding)

    def forward(self, x):
        return self.cbr(x)


def test_plain_block_and_sequential_nesting():
    net = nn.Sequential()
    net.add(SeedCNN1D(8, 3, padding=1), SeedCNN1D(8, 3, stride=2))
    net.initialize()
    x = mx.nd.random.normal(shape=(2, 3, 20))
    with autograd.record():
        y = net(x)
    y.backward()
    assert y.shape == (2, 8, 9)
    names = list(net.collect_params().keys())
    assert len(set(names)) == 12
    assert sorted({n.rsplit("_", 1)[-1] for n in names}) == ["beta", "bias", "gamma", "mean",
                                                             "var", "weight"]
    assert net[0].cbr.weight.grad().abs().sum().asscalar() > 0


STOCK_CNN1D = textwrap.dedent("""
    import mxnet as mx
    from mxnet import autograd, gluon
    class CNN1D(gluon.Block):
        def __init__(self, channels, kernel, stride=1, padding=0, **kwargs):
            super().__init__(**kwargs)
            with self.name_scope():
                self.conv = gluon.nn.Conv1D(channels=channels, kernel_size=kernel,
                                            strides=stride, padding=padding)
                self.bn = gluon.nn.BatchNorm()
                self.ramp = gluon.nn.Activation(activation='relu')
        def forward(self, x):
            return self.ramp(self.bn(self.conv(x)))
    net = CNN1D(64, 3, padding=1)
    net.initialize()
    x = mx.nd.random.normal(shape=(4, 64, 32))
    with autograd.record():
        loss = net(x).sum()
    loss.backward()
    mx.nd.waitall()
    print("stock CNN1D trained")
""")


def test_seed_cnn1d_crashes_stock_but_trains_fused():
    env = dict(os.environ, MXNET_MKLDNN_ENABLED="1")
    stock = subprocess.run([sys.executable, "-c", STOCK_CNN1D], capture_output=True,
                           text=True, env=env, timeout=120)
    assert stock.returncode != 0 and "is_view" in stock.stderr, (
        "stock MXNet 1.9.1 Conv1D+BatchNorm with 64 channels was expected to crash in "
        f"backward (docs/mxnet-facts.md); rc={stock.returncode}\n{stock.stdout}\n"
        f"{stock.stderr[-2000:]}")

    net = SeedCNN1D(64, 3, padding=1)
    net.initialize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05})
    x = mx.nd.random.normal(shape=(4, 64, 32))
    target = mx.nd.random.uniform(shape=(4, 64, 32))
    losses = []
    for _ in range(5):
        with autograd.record():
            loss = ((net(x) - target) ** 2).mean()
        loss.backward()
        trainer.step(4)
        losses.append(loss.asscalar())
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_symbol_api_names_shapes_types_bind_and_json():
    data = mx.sym.var("data")
    sym = mx.sym.Custom(data, op_type="fusedres_conv1d_bn_relu", num_filter=6, kernel=3,
                        pad=1, stride=2, name="c1")
    sym = fusedres.add_relu(sym, mx.sym.var("skip"), name="join")
    assert sym.list_arguments() == ["data", "c1_weight", "c1_bias", "c1_gamma", "c1_beta",
                                    "skip"]
    assert sym.list_auxiliary_states() == ["c1_running_mean", "c1_running_var"]
    # Shapes from the data shape alone (the skip's shape comes from the join).
    arg_shapes, out_shapes, aux_shapes = sym.infer_shape(data=(2, 4, 11))
    assert arg_shapes == [(2, 4, 11), (6, 4, 3), (6,), (6,), (6,), (2, 6, 6)]
    assert out_shapes == [(2, 6, 6)] and aux_shapes == [(6,), (6,)]
    arg_types, out_types, aux_types = sym.infer_type(data=np.float64)
    assert set(arg_types + out_types + aux_types) == {np.float64}

    rng = np.random.default_rng(0)
    args = {n: mx.nd.array(rng.standard_normal(s)) for n, s in
            zip(sym.list_arguments(), arg_shapes)}
    aux = {"c1_running_mean": mx.nd.zeros((6,)), "c1_running_var": mx.nd.ones((6,))}
    out = sym.bind(mx.cpu(), args=args, aux_states=aux).forward()[0].asnumpy()
    loaded = mx.sym.load_json(sym.tojson())
    assert loaded.list_arguments() == sym.list_arguments()
    again = loaded.bind(mx.cpu(), args=args, aux_states=aux).forward()[0].asnumpy()
    np.testing.assert_array_equal(out, again)
    assert out.min() >= 0 and out.max() > 0
    # simple_bind allocates from the data shape alone; a training step runs through it.
    exe = sym.simple_bind(mx.cpu(), data=(2, 4, 11), skip=(2, 6, 6))
    for name, arr in args.items():
        exe.arg_dict[name][:] = arr
    exe.aux_dict["c1_running_var"][:] = 1
    exe.forward(is_train=True)
    exe.backward(mx.nd.ones((2, 6, 6)))
    assert exe.grad_dict["c1_weight"].abs().sum().asscalar() > 0
    assert exe.aux_dict["c1_running_var"].asnumpy().tolist() != [1.0] * 6


def test_partial_shape_inference_without_data_shape():
    sym = mx.sym.Custom(mx.sym.var("data"), op_type="fusedres_conv1d_bn_relu",
                        num_filter=6, kernel=3, name="c1")
    arg_shapes, out_shapes, _ = sym.infer_shape_partial()
    assert out_shapes == [()]


def test_repr_and_deferred_init():
    blk = ConvBNReLU1D(64, 3, strides=2, padding=1, groups=2)
    assert repr(blk).startswith("ConvBNReLU1D(None -> 64, kernel_size=(3,), stride=(2,)")
    blk.initialize()
    blk(mx.nd.ones((1, 8, 10)))
    assert blk.weight.shape == (64, 4, 3)
    assert repr(blk).startswith("ConvBNReLU1D(8 -> 64, kernel_size=(3,), stride=(2,), "
                                "padding=(1,), groups=2")
    assert repr(AddReLU()) == "AddReLU()"


def test_exit_with_queued_ops_does_not_hang():
    """Ops still queued at interpreter exit must finish cleanly (fusedres waits for them in an
    exit hook; without it, MXNet's shutdown hung or crashed about half the time)."""
    script = textwrap.dedent("""
        import mxnet as mx
        import fusedres
        from fusedres.nn import ConvBNReLU1D, SkipConnection
        x = mx.nd.random.normal(shape=(2, 8, 30))
        net = SkipConnection(ConvBNReLU1D(4, 3, padding=1), mode="concat", activation=None)
        net.initialize()
        net.hybridize()
        for _ in range(3):
            print(net(x).shape)  # the shape is known before the ops have run
    """)
    for _ in range(4):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_float16_types_follow_gluon_batchnorm(impl_env):
    """Under cast('float16') BatchNorm keeps its parameters float32; the fused op's types
    follow. The float16 kernels are GPU-only: on the GPU the block computes what the float64
    reference says, on the CPU it refuses float16 by name."""
    blk = ConvBNReLU1D(4, 3, in_channels=2)
    blk.cast("float16")
    assert np.dtype(blk.weight.dtype) == np.float16 == np.dtype(blk.bias.dtype)
    assert {np.dtype(p.dtype) for p in (blk.gamma, blk.beta, blk.running_mean,
                                        blk.running_var)} == {np.dtype(np.float32)}
    # float16 runs on GPUs, in the CustomOp: its type inference.
    sym = fusedres.conv1d_bn_relu(*(mx.sym.var(n) for n in ["data", "w", "b", "g", "be", "rm",
                                                             "rv"]), kernel=3, num_filter=4,
                                  use_native=False)
    args, outs, aux = sym.infer_type(data=np.float16)
    assert args == [np.float16] * 3 + [np.float32] * 2 and outs == [np.float16]
    assert aux == [np.float32] * 2
    args, _, _ = sym.infer_type(data=np.float16, g=np.float16)
    assert args[3:] == [np.float16] * 2
    blk.initialize()
    x = mx.nd.array(np.random.default_rng(0).standard_normal((1, 2, 8)), dtype="float16")
    if impl_env != "gpu":
        with pytest.raises(TypeError, match="data must be float32 or float64.*CPU"):
            blk(x)
        return
    y = blk(x)  # a predict-mode forward: the running statistics normalize
    p = [None if getattr(blk, k) is None else getattr(blk, k).data().asnumpy().astype(np.float64)
         for k in ("weight", "bias", "gamma", "beta", "running_mean", "running_var")]
    want = R.conv1d_bn_relu_forward(x.asnumpy().astype(np.float64), *p, is_train=False)[0]
    assert y.dtype == np.float16
    assert_close(y.asnumpy(), want, np.float16, "float16 output on the GPU")


@pytest.mark.parametrize("use_native", [False, True], ids=["custom-ops", "native-ops"])
def test_input_from_an_mkldnn_operator(use_native):
    """A stock MKLDNN conv may hand over its output in a blocked layout; the fused ops must
    read the values, not the raw memory (the CustomOp alone would read garbage)."""
    conv = nn.Conv1D(16, 3, padding=1, in_channels=8)
    fused = ConvBNReLU1D(16, 3, padding=1, in_channels=16, use_native=use_native)
    join = AddReLU(use_native=use_native)
    for b in (conv, fused, join):
        b.initialize()
    x = mx.nd.random.normal(shape=(4, 8, 32))
    h = conv(x)
    plain = mx.nd.array(h.asnumpy())
    assert_close(fused(h).asnumpy(), fused(plain).asnumpy(), np.float32, "conv1d_bn_relu")
    assert_close(join(h, h).asnumpy(), join(plain, plain).asnumpy(), np.float32, "add_relu")


@pytest.mark.parametrize("static_alloc", [False, True])
def test_inference_follows_training_updates_and_set_data(static_alloc):
    """Inference calls between training steps see the updated weights and running statistics
    (the CPU kernels keep packed weights between inference calls: csrc/cpu/pack_cache.h), and a
    Parameter's set_data, in every hybridization the user may pick; checked against the
    reference on the block's current parameters (stock MKLDNN blocks refuse set_data after an
    inference: docs/mxnet-facts.md)."""
    fused = ConvBNReLU1D(24, 3, in_channels=16, padding=1)
    fused.initialize()
    _random_init(fused, 4)
    fused.hybridize(static_alloc=static_alloc)
    trainer = gluon.Trainer(fused.collect_params(), "sgd", {"learning_rate": 0.5})
    x = mx.nd.random.normal(shape=(3, 16, 40))

    def expected():
        p = {n.split("_", 1)[1]: v.data().asnumpy().astype(np.float64)
             for n, v in fused.collect_params().items()}
        return R.conv1d_bn_relu_forward(x.asnumpy().astype(np.float64), p["weight"], p["bias"],
                                        p["gamma"], p["beta"], p["running_mean"],
                                        p["running_var"], pad=1, is_train=False)[0]

    for step in range(3):
        for _ in range(2):   # twice: the second call can come from the kept weights
            assert_close(fused(x).asnumpy(), expected(), "float32", f"inference, step {step}")
        with autograd.record():
            loss = (fused(x) * mx.nd.arange(40)).sum()
        loss.backward()
        trainer.step(3)
    fused.weight.set_data(fused.weight.data() * -0.5)
    fused.running_var.set_data(fused.running_var.data() * 3)
    for _ in range(2):
        assert_close(fused(x).asnumpy(), expected(), "float32", "inference after set_data")
