"""fusedres.nn.MaxPool1D / AvgPool1D and the _fusedres_pool1d operator: the same results and
gradients as MXNet's stock 1-D pooling blocks on random configurations (odd sizes, padding,
ceil_mode, count_include_pad), in float64 by numeric gradients, with NaN and infinities, in
the combinations users build (after a fused block, hybridized with static_alloc, grad_req='add',
export), clear errors on bad input, and fuse() putting them in place of the stock blocks."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.gluon import nn

import fusedres
from fusedres.nn import AvgPool1D, ConvBNReLU1D, MaxPool1D


def _configs(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        k = int(rng.integers(1, 8))
        pad = int(rng.integers(0, k))
        width = int(rng.integers(max(1, k - 2 * pad), 40))
        out.append(dict(kernel=k, stride=int(rng.integers(1, 5)), pad=pad, width=width,
                        ceil_mode=bool(rng.integers(2)), count_include_pad=bool(rng.integers(2)),
                        batch=int(rng.integers(1, 4)), channels=int(rng.integers(1, 6))))
    # the 1-D ResNet stem's pooling, on a row long enough for the interior loop
    out.append(dict(kernel=3, stride=2, pad=1, width=101, ceil_mode=False,
                    count_include_pad=True, batch=2, channels=3))
    return out


def _blocks(kind, c):
    kw = dict(pool_size=c["kernel"], strides=c["stride"], padding=c["pad"],
              ceil_mode=c["ceil_mode"])
    if kind == "avg":
        kw["count_include_pad"] = c["count_include_pad"]
        return nn.AvgPool1D(**kw), AvgPool1D(**kw)
    return nn.MaxPool1D(**kw), MaxPool1D(**kw)


def _run(block, x, dy, grad_req="write"):
    x = x.copy()
    x.attach_grad(grad_req)
    with autograd.record():
        y = block(x)
    y.backward(dy)
    return y.asnumpy(), x.grad.asnumpy()


def _twins(model):
    """model(stock MaxPool1D(3, 2, 1)) and model(fusedres's), initialized to the same values."""
    stock, fused = model(nn.MaxPool1D(3, 2, 1)), model(MaxPool1D(3, 2, 1))
    for net in (stock, fused):
        net.initialize(mx.init.Xavier())
    for a, b in zip(stock.collect_params().values(), fused.collect_params().values()):
        b.set_data(a.data())
    return stock, fused


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("hybridize", [False, True])
def test_matches_stock_pooling_on_random_configurations(kind, dtype, hybridize):
    rng = np.random.default_rng(1)
    for c in _configs(25, seed={"max": 2, "avg": 3}[kind]):
        stock, fused = _blocks(kind, c)
        if hybridize:
            stock.hybridize()
            fused.hybridize(static_alloc=True)
        shape = (c["batch"], c["channels"], c["width"])
        # max: distinct values, so the position of each max is unambiguous
        x = mx.nd.array(rng.permutation(np.prod(shape)).reshape(shape) * 0.01 - 1
                        if kind == "max" else rng.standard_normal(shape), dtype=dtype)
        x64 = x.astype("float64")
        sy64 = stock(x64)
        dy = mx.nd.array(rng.standard_normal(sy64.shape), dtype=dtype)
        fy, fg = _run(fused, x, dy)
        # Against stock float64 (MXNet's own pooling), forward and gradient: MXNet 1.9.1's
        # float32 pooling (oneDNN) fails on some of these windows ("could not create a
        # descriptor"), and its average backward divides a ceil_mode window that runs past
        # the padding by the whole kernel while the forward divides by the clipped window, so
        # it is not the gradient of its forward there (docs/mxnet-facts.md).
        sy, sg = _run(stock, x64, dy.astype("float64"))
        # a max over a window wholly in the padding is the dtype's lowest value
        sy[sy == np.finfo(np.float64).min] = np.finfo(dtype).min
        tol = 1e-6 if dtype == "float32" else 1e-13
        np.testing.assert_allclose(fy, sy, rtol=tol, atol=tol, err_msg=str(c))
        np.testing.assert_allclose(fg, sg, rtol=tol, atol=tol, err_msg=str(c))
        if dtype == "float32":   # and the float32 forward, where stock float32 runs
            try:
                sy = stock(x).asnumpy()
            except mx.MXNetError as err:
                assert "descriptor" in str(err)
            else:
                np.testing.assert_allclose(fy, sy, rtol=tol, atol=tol, err_msg=str(c))
        if kind == "max":
            np.testing.assert_array_equal(fy, sy, err_msg=str(c))


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_numeric_gradient_float64(kind):
    for c in _configs(6, seed=7):
        data = mx.sym.Variable("data")
        sym = fusedres.ops.native.pool1d(
            mx.sym, data, kernel=c["kernel"], stride=c["stride"], pad=c["pad"], pool_type=kind,
            # ceil_mode can leave a window wholly in the padding: a max of the dtype's lowest
            # value, whose finite differences overflow
            pooling_convention="full" if c["ceil_mode"] and kind == "avg" else "valid",
            count_include_pad=c["count_include_pad"])
        shape = (c["batch"], c["channels"], c["width"])
        rng = np.random.default_rng(0)
        # distinct values well apart: the finite differences never cross a max's tie
        x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64)
        mx.test_utils.check_numeric_gradient(sym, [x], numeric_eps=1e-3, rtol=1e-6, atol=1e-8,
                                             dtype=np.float64)


def test_nan_and_infinities_as_stock():
    v = np.array([[[1, np.nan, 3, 0, -1, np.nan, np.inf, -np.inf, 2, np.nan, np.nan, np.nan,
                    -np.inf, -np.inf, -np.inf, 5]]], dtype=np.float32)
    for kind in ("max", "avg"):
        for k, s, p in ((3, 2, 1), (3, 3, 0), (2, 1, 1)):
            c = dict(kernel=k, stride=s, pad=p, ceil_mode=False, count_include_pad=True)
            stock, fused = _blocks(kind, c)
            x = mx.nd.array(v)
            dy = mx.nd.ones(stock(x).shape)
            sy, sg = _run(stock, x, dy)
            fy, fg = _run(fused, x, dy)
            np.testing.assert_array_equal(fy, sy, err_msg=f"{kind} {c}")
            np.testing.assert_array_equal(fg, sg, err_msg=f"{kind} {c}")


def test_after_a_fused_block_hybridized_static_alloc_accumulating_and_exported(tmp_path):
    def model(pool):
        net = nn.HybridSequential()
        net.add(ConvBNReLU1D(8, 3, padding=1, in_channels=4), pool, nn.Dense(3, in_units=8 * 17))
        return net

    stock, fused = _twins(model)
    x = mx.nd.random.normal(shape=(5, 4, 33))
    results = []
    for net in (stock, fused):
        net.hybridize(static_alloc=True, static_shape=True)
        net.collect_params().setattr("grad_req", "add")
        for _ in range(2):   # accumulated over two steps
            with autograd.record():
                y = net(x)
            y.backward()
        results.append([y.asnumpy()] + [p.grad().asnumpy() for p in
                                        net.collect_params().values() if p.grad_req != "null"])
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    fused.export(str(tmp_path / "m"))
    back = gluon.SymbolBlock.imports(str(tmp_path / "m-symbol.json"), ["data"],
                                     str(tmp_path / "m-0000.params"))
    sym = open(tmp_path / "m-symbol.json").read()
    assert "_fusedres_pool1d" in sym
    np.testing.assert_allclose(back(x).asnumpy(), fused(x).asnumpy(), rtol=1e-6, atol=1e-6)


def test_fuse_replaces_stock_pooling_in_sequentials_and_custom_blocks():
    class Custom(gluon.HybridBlock):
        def __init__(self, **kw):
            super().__init__(**kw)
            with self.name_scope():
                self.pool = nn.AvgPool1D(3, 2, 1, count_include_pad=False)
                self.keep = nn.MaxPool1D(2, layout="NWC")   # not NCW: left as it is

        def hybrid_forward(self, F, x):
            return self.pool(x) + 1

    net = nn.HybridSequential()
    net.add(nn.Conv1D(6, 3, padding=1, in_channels=2), nn.BatchNorm(), nn.Activation("relu"),
            nn.MaxPool1D(3, 2, 1, ceil_mode=True), Custom(), nn.GlobalAvgPool1D())
    net.initialize()
    net.hybridize()
    x = mx.nd.random.normal(shape=(3, 2, 29))
    with autograd.predict_mode():
        want = net(x).asnumpy()
    report = fusedres.fuse(net)
    assert [type(b).__name__ for b in net._children.values()][:3] == \
        ["ConvBNReLU1D", "MaxPool1D", "Custom"]
    assert isinstance(net[1], MaxPool1D) and isinstance(net[2].pool, AvgPool1D)
    assert type(net[2].keep) is nn.MaxPool1D and type(net[3]) is nn.GlobalAvgPool1D
    assert len(report.pooling) == 2 and "replaced 2 1-D pooling block(s)" in str(report)
    with autograd.predict_mode():
        np.testing.assert_allclose(net(x).asnumpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, shape, match", [
    (dict(pool_size=3, padding=3), (2, 3, 10), "pad"),
    (dict(pool_size=9, padding=1), (2, 3, 5), "kernel"),
    (dict(pool_size=2), (2, 3, 4, 5), "3-D"),
])
def test_bad_input_is_refused_naming_the_argument(kw, shape, match):
    block = MaxPool1D(**kw)
    with pytest.raises((ValueError, mx.MXNetError), match=match):
        block(mx.nd.ones(shape)).wait_to_read()
    with pytest.raises((ValueError, mx.MXNetError), match=match):
        mx.nd._internal._fusedres_pool1d(
            mx.nd.ones(shape), kernel=kw["pool_size"], stride=1, pad=kw.get("padding", 0),
            pool_type="max", pooling_convention="valid",
            count_include_pad=True).wait_to_read()
    with pytest.raises(ValueError, match="layout"):
        MaxPool1D(2, layout="NWC")
    with pytest.raises((ValueError, mx.MXNetError), match="pool_type"):
        mx.nd._internal._fusedres_pool1d(mx.nd.ones((1, 1, 4)), kernel=2, pool_type="sum")
    with pytest.raises((TypeError, mx.MXNetError), match="float32 or float64"):
        mx.nd._internal._fusedres_pool1d(mx.nd.ones((1, 1, 4), dtype="int32"),
                                         kernel=2).wait_to_read()


def test_float16_and_use_native_false_take_mxnets_pooling():
    x = mx.nd.random.normal(shape=(2, 3, 12))
    half = MaxPool1D(3, 2, 1)
    np.testing.assert_array_equal(half(x.astype("float16")).asnumpy(),
                                  nn.MaxPool1D(3, 2, 1)(x.astype("float16")).asnumpy())
    stock = MaxPool1D(3, 2, 1, use_native=False)
    stock.hybridize()
    np.testing.assert_array_equal(stock(x).asnumpy(), nn.MaxPool1D(3, 2, 1)(x).asnumpy())
    assert "_fusedres_pool1d" not in stock._cached_graph[1].tojson()
    native = MaxPool1D(3, 2, 1)
    native.hybridize()
    native(x)
    assert "_fusedres_pool1d" in native._cached_graph[1].tojson()


def test_windows_past_the_padding_and_a_rebuilt_graph_for_another_dtype():
    # ceil_mode with stride > kernel: the last window starts past the row (MXNet: an average of
    # 0, a max of the lowest value)
    x = mx.nd.arange(1, 6).reshape((1, 1, 5)).astype("float64")
    for kind in ("max", "avg"):
        c = dict(kernel=1, stride=3, pad=0, ceil_mode=True, count_include_pad=True)
        stock, fused = _blocks(kind, c)
        np.testing.assert_array_equal(fused(x).asnumpy(), stock(x).asnumpy())
    block = MaxPool1D(3, 2, 1)
    block.hybridize()
    y = mx.nd.random.normal(shape=(2, 3, 12))
    block(y)
    np.testing.assert_array_equal(block(y.astype("float16")).asnumpy(),
                                  nn.MaxPool1D(3, 2, 1)(y.astype("float16")).asnumpy())
    np.testing.assert_array_equal(block(y).asnumpy(), nn.MaxPool1D(3, 2, 1)(y).asnumpy())


def test_fuse_leaves_pooling_the_operator_refuses():
    net = nn.HybridSequential()
    net.add(nn.MaxPool1D(2, 1, padding=2))
    assert not fusedres.fuse(net).pooling


@pytest.mark.parametrize("static_alloc", [False, True])
def test_between_mkldnn_operators(static_alloc):
    """Stock (MKLDNN) Conv1D before the pooling and Conv1D after it, forward and backward."""
    def model(pool):
        net = nn.HybridSequential()
        net.add(nn.Conv1D(8, 3, padding=1, in_channels=4), pool,
                nn.Conv1D(8, 3, padding=1, in_channels=8))
        return net

    stock, fused = _twins(model)
    x = mx.nd.random.normal(shape=(3, 4, 40))
    out = []
    for net in (stock, fused):
        net.hybridize(static_alloc=static_alloc)
        xi = x.copy()
        xi.attach_grad()
        with autograd.record():
            y = net(xi)
        y.backward()
        out.append([y.asnumpy(), xi.grad.asnumpy()] +
                   [p.grad().asnumpy() for p in net.collect_params().values()])
    for got, want in zip(out[1], out[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
