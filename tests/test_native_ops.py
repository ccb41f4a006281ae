"""The native (mx.library) ops against the numpy reference and the CustomOps: forward, all
gradients, running statistics, inference, use_global_stats, dtypes, odd shapes; hybridize,
export and import in a fresh process; bad input; and the two places where MXNet's library API
differs from a CustomOp (no req, so no grad_req='add'; no is_train for the legacy executor)."""
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest
from conftest import (CONV_CASES, GRAD_NAMES, assert_close, assert_step, away_from_kink,
                      conv_inputs, conv_with_ones,
                      nd_inputs, reference_step, run_step)
from mxnet import autograd
from mxnet.gluon import HybridBlock

import fusedres
from fusedres import reference as R
from fusedres.ops import native

OK, WHY = native.available()
if not OK:
    # Part of the package wherever MXNet is installed before fusedres is built (make setup,
    # the wheel); a missing library is a build problem to report, not a reason to skip.
    pytest.fail(f"native ops unavailable: {WHY}", pytrace=False)

DTYPES = [np.float32, np.float64]
_reference, _nd, _run = reference_step, nd_inputs, run_step


def _check(arrs, y, ref_y, grads, rm, rv, dtype):
    assert y.dtype == dtype
    assert_step(arrs, y, ref_y, grads, rm, rv, dtype)


# ------------------------------------------------------------------ conv against the reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_training_matches_reference(case, dtype):
    inp, conv = conv_inputs(case, dtype)
    y_ref, dy, grads, rm, rv = _reference(inp, conv)
    arrs = _nd(inp)
    y = _run(native.conv1d_bn_relu, arrs, conv, dy)
    _check(arrs, y, y_ref, grads, rm, rv, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_use_global_stats(case, dtype):
    inp, conv = conv_inputs(case, dtype)
    y_ref, dy, grads, rm, rv = _reference(inp, conv, use_global_stats=True)
    arrs = _nd(inp)
    y = _run(native.conv1d_bn_relu, arrs, conv, dy, use_global_stats=True)
    _check(arrs, y, y_ref, grads, rm, rv, dtype)
    np.testing.assert_array_equal(arrs["running_mean"].asnumpy(), inp["running_mean"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_inference_folds_bn_and_keeps_running_stats(case, dtype):
    inp, conv = conv_inputs(case, dtype)
    y_ref, _, _, _, _ = _reference(inp, conv, training=False)
    arrs = _nd(inp)
    y = native.conv1d_bn_relu(arrs["data"], arrs["weight"], arrs["bias"], arrs["gamma"],
                              arrs["beta"], arrs["running_mean"], arrs["running_var"], **conv)
    assert_close(y.asnumpy(), y_ref, dtype, "inference output")
    np.testing.assert_array_equal(arrs["running_mean"].asnumpy(), inp["running_mean"])
    np.testing.assert_array_equal(arrs["running_var"].asnumpy(), inp["running_var"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_backward_after_inference_mode_forward(dtype):
    # record(train_mode=False): forward uses the running statistics and so does the gradient.
    inp, conv = conv_inputs(CONV_CASES[0].values[0], dtype)
    y_ref, dy, grads, rm, rv = _reference(inp, conv, training=False)
    arrs = _nd(inp)
    y = _run(native.conv1d_bn_relu, arrs, conv, dy, train_mode=False)
    _check(arrs, y, y_ref, grads, rm, rv, dtype)


def test_conv_retain_graph_second_backward_is_the_same():
    inp, conv = conv_inputs(CONV_CASES[1].values[0], np.float64)
    _, dy, grads, _, _ = _reference(inp, conv)
    arrs = _nd(inp)
    with autograd.record():
        y = native.conv1d_bn_relu(arrs["data"], arrs["weight"], arrs["bias"], arrs["gamma"],
                                  arrs["beta"], arrs["running_mean"], arrs["running_var"], **conv)
    y.backward(mx.nd.array(dy, dtype=y.dtype), retain_graph=True)
    y.backward(mx.nd.array(dy, dtype=y.dtype))
    assert_close(arrs["weight"].grad.asnumpy(), grads["weight"], np.float64, "dweight")


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[4], CONV_CASES[5]])
def test_conv_matches_customop(case):
    inp, conv = conv_inputs(case, np.float32)
    _, dy, _, _, _ = _reference(inp, conv)
    a, b = _nd(inp), _nd(inp)
    ya = _run(native.conv1d_bn_relu, a, conv, dy)
    yb = _run(fusedres.conv1d_bn_relu, b, conv, dy)
    assert_close(ya.asnumpy(), yb.asnumpy(), np.float32, "output")
    for k in GRAD_NAMES + ["running_mean", "running_var"]:
        if a[k] is not None:
            got = a[k].grad if k in GRAD_NAMES else a[k]
            want = b[k].grad if k in GRAD_NAMES else b[k]
            assert_close(got.asnumpy(), want.asnumpy(), np.float32, k)


# ------------------------------------------------------------------ add_relu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 97), (3, 5), (1,)])
def test_add_relu_matches_reference(shape, dtype):
    rng = np.random.default_rng(0)
    a_np, b_np = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    y_ref = R.add_relu_forward(a_np.astype(np.float64), b_np.astype(np.float64))
    dy = away_from_kink(rng.standard_normal(shape), a_np.astype(np.float64) + b_np)
    da_ref, db_ref = R.add_relu_backward(dy, y_ref)
    a, b = mx.nd.array(a_np, dtype=dtype), mx.nd.array(b_np, dtype=dtype)
    a.attach_grad()
    b.attach_grad()
    with autograd.record():
        y = native.add_relu(a, b)
    y.backward(mx.nd.array(dy, dtype=dtype))
    assert y.dtype == dtype
    assert_close(y.asnumpy(), y_ref, dtype, "output")
    assert_close(a.grad.asnumpy(), da_ref, dtype, "dlhs")
    assert_close(b.grad.asnumpy(), db_ref, dtype, "drhs")


# ------------------------------------------------------------------ Gluon: hybridize, export
class _NativeRes(HybridBlock):
    """relu(bn(conv(x))) + x, relu'd, on the native ops; parameters as ConvBNReLU1D's."""

    def __init__(self, c=7, k=3, no_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.c, self.k, self.no_bias = c, k, no_bias
        with self.name_scope():
            self.weight = self.params.get("weight", shape=(c, 0, k), allow_deferred_init=True)
            self.bias = None if no_bias else self.params.get("bias", shape=(c,), init="zeros")
            self.gamma = self.params.get("gamma", shape=(c,), init="ones")
            self.beta = self.params.get("beta", shape=(c,), init="zeros")
            self.running_mean = self.params.get("running_mean", shape=(c,), init="zeros",
                                                grad_req="null", differentiable=False)
            self.running_var = self.params.get("running_var", shape=(c,), init="ones",
                                               grad_req="null", differentiable=False)

    def hybrid_forward(self, F, x, weight, gamma, beta, running_mean, running_var, bias=None):
        y = native.conv1d_bn_relu(x, weight, bias, gamma, beta, running_mean, running_var,
                                  kernel=self.k, num_filter=self.c, pad=self.k // 2, F=F)
        return native.add_relu(y, x, F=F)


def _net(seed=0, **kwargs):
    mx.random.seed(seed)
    net = mx.gluon.nn.HybridSequential()
    with net.name_scope():
        net.add(_NativeRes(**kwargs), _NativeRes(**kwargs))
    net.initialize(mx.init.Normal(0.3))
    return net


def _train_steps(net, x, steps=2):
    out = []
    for i in range(steps):
        with autograd.record():
            y = net(x)
        y.backward(mx.nd.array(np.random.default_rng(i).standard_normal(y.shape)))
        out.append([y.asnumpy()] + [p.grad().asnumpy().copy()
                                    for p in net.collect_params().values()
                                    if p.grad_req != "null"])
    stats = [p.data().asnumpy() for n, p in sorted(net.collect_params().items())
             if "running" in n]
    return out, stats


@pytest.mark.parametrize("flags", [{}, {"static_alloc": True, "static_shape": True}])
def test_hybridized_training_matches_imperative(flags):
    x = mx.nd.array(np.random.default_rng(3).standard_normal((2, 7, 97)))
    ref, ref_stats = _train_steps(_net(), x)
    net = _net()
    net.hybridize(**flags)
    got, stats = _train_steps(net, x)
    for step_ref, step in zip(ref, got):
        for a, b in zip(step_ref, step):
            assert_close(b, a, np.float32, "hybridized vs imperative")
    for a, b in zip(ref_stats, stats):
        assert_close(b, a, np.float32, "running stats")
    # and inference after training uses the (updated) running statistics
    assert_close(net(x).asnumpy(), _net_like(net)(x).asnumpy(), np.float32, "inference")


def _net_like(trained):
    net = _net(seed=1)
    for (_, src), (_, dst) in zip(sorted(trained.collect_params().items()),
                                  sorted(net.collect_params().items())):
        dst.set_data(src.data())
    return net


def test_hybridized_net_matches_customop_blocks():
    from fusedres.nn import AddReLU, ConvBNReLU1D

    x = mx.nd.array(np.random.default_rng(4).standard_normal((2, 7, 33)))
    ours = _net()
    ours.hybridize()
    ref = mx.gluon.nn.HybridSequential()
    ref.add(ConvBNReLU1D(7, 3, padding=1, in_channels=7))
    ref.initialize()
    ref(x)  # materialize
    blk = _NativeRes()
    blk.initialize()
    blk(x)
    for name in ["weight", "bias", "gamma", "beta", "running_mean", "running_var"]:
        getattr(blk, name).set_data(getattr(ref[0], name).data())
    blk.hybridize()
    add = AddReLU()
    with autograd.record():
        y_ref = add(ref(x), x)
        y = blk(x)
    assert_close(y.asnumpy(), y_ref.asnumpy(), np.float32, "training forward")
    assert_close(blk(x).asnumpy(), add(ref(x), x).asnumpy(), np.float32, "inference")


def test_export_and_import_in_fresh_process(tmp_path):
    net = _net(no_bias=True)
    net.hybridize()
    x = mx.nd.array(np.random.default_rng(5).standard_normal((3, 7, 41)))
    _train_steps(net, x, steps=1)  # move the running statistics off their init
    y = net(x).asnumpy()
    prefix = str(tmp_path / "native_net")
    net.export(prefix)
    np.save(tmp_path / "x.npy", x.asnumpy())
    np.save(tmp_path / "y.npy", y)
    with open(prefix + "-symbol.json") as f:
        assert native.CONV1D_BN_RELU in f.read()
    script = textwrap.dedent(f"""
        import sys, numpy as np, mxnet as mx
        try:
            mx.gluon.SymbolBlock.imports({prefix!r} + "-symbol.json", ["data"],
                                         {prefix!r} + "-0000.params")
            sys.exit("imported without loading the library")
        except Exception:
            pass
        from fusedres.ops import native
        native.load()
        net = mx.gluon.SymbolBlock.imports({prefix!r} + "-symbol.json", ["data"],
                                           {prefix!r} + "-0000.params")
        net.hybridize()
        y = net(mx.nd.array(np.load({str(tmp_path / 'x.npy')!r}))).asnumpy()
        err = np.abs(y - np.load({str(tmp_path / 'y.npy')!r})).max()
        assert err < 1e-5, err
        print("ok", err)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_symbol_api():
    names = ["data", "w", "b", "g", "be", "rm", "rv"]
    shapes = dict(data=(2, 7, 97), w=(7, 7, 3), b=(7,), g=(7,), be=(7,), rm=(7,), rv=(7,))
    vars_ = [mx.sym.var(n, shape=shapes[n]) for n in names]
    sym = native.conv1d_bn_relu(*vars_, kernel=3, num_filter=7, pad=1)
    assert sym.list_arguments() == names[:5]
    assert sym.list_auxiliary_states() == ["rm", "rv"]
    _, out, aux = sym.infer_shape()
    assert out == [(2, 7, 97)] and aux == [(7,), (7,)]
    # Partially known shapes (rank known, a dimension 0) are completed from data's.
    w = mx.sym.var("w", shape=(7, 0, 3))
    sym = native.conv1d_bn_relu(vars_[0], w, *vars_[2:], kernel=3, num_filter=7, pad=1)
    args, _, _ = sym.infer_shape()
    assert args[1] == (7, 7, 3)


# ------------------------------------------------------------------ errors
def _conv(data, **kw):
    return conv_with_ones(native.conv1d_bn_relu, data, **kw)


@pytest.mark.parametrize("call, err, match", [
    (lambda: _conv(mx.nd.ones((2, 3))), ValueError, r"data must be 3-D"),
    (lambda: _conv(mx.nd.ones((2, 3, 4, 5))), ValueError, r"data must be 3-D"),
    (lambda: native.conv1d_bn_relu(mx.nd.ones((2, 3, 10)), mx.nd.ones((4, 5, 3)),
                                   *[mx.nd.ones((4,))] * 5, kernel=3, num_filter=4),
     ValueError, r"weight must have shape \(4, 3, 3\).*got \(4, 5, 3\)"),
    (lambda: native.conv1d_bn_relu(mx.nd.ones((2, 3, 10)), mx.nd.ones((4, 3, 3)),
                                   mx.nd.ones((4,)), mx.nd.ones((5,)), *[mx.nd.ones((4,))] * 3,
                                   kernel=3, num_filter=4),
     ValueError, r"gamma must have shape \(4,\), got \(5,\)"),
    (lambda: _conv(mx.nd.ones((2, 3, 10)), num_group=2), ValueError,
     r"num_group \(2\) must divide data's channels \(3\)"),
    (lambda: _conv(mx.nd.ones((2, 3, 4)), kernel=5), ValueError,
     r"kernel \(dilated extent 5\) is larger than the padded width"),
    (lambda: _conv(mx.nd.ones((2, 3, 10)), stride=0), ValueError, r"stride must be >= 1"),
    (lambda: _conv(mx.nd.ones((2, 3, 10)), eps=0), ValueError, r"eps must be > 0"),
    (lambda: _conv(mx.nd.ones((2, 3, 10)), stride=(1, 2)), ValueError,
     r"stride must be a single int"),
    (lambda: _conv(mx.nd.ones((2, 3, 10), dtype="int32")), TypeError,
     r"data must be float32 or float64.*got int32"),
    (lambda: _conv(mx.nd.ones((2, 3, 10), dtype="float16")), TypeError,
     r"data must be float32 or float64.*CPU.*got float16"),
    (lambda: native.conv1d_bn_relu(mx.nd.ones((2, 3, 10), dtype="float64"),
                                   mx.nd.ones((4, 3, 3)), *[mx.nd.ones((4,), dtype="float64")] * 5,
                                   kernel=3, num_filter=4),
     TypeError, r"weight must have the same dtype as data \(float64\), got float32"),
    (lambda: native.add_relu(mx.nd.ones((2, 3)), mx.nd.ones((3, 2))), ValueError,
     r"rhs must have the same shape as lhs \(2, 3\), got \(3, 2\).*does not broadcast"),
    (lambda: native.add_relu(mx.nd.ones((3,), dtype="int64"), mx.nd.ones((3,), dtype="int64")),
     TypeError, r"lhs must be float32 or float64"),
])
def test_bad_input_names_the_argument(call, err, match):
    with pytest.raises(err, match=match):
        call()
    # and the error does not stick to later, valid calls (lib_api keeps a global error list)
    assert native.add_relu(mx.nd.ones((2,)), mx.nd.ones((2,))).asnumpy().tolist() == [2, 2]


def test_bad_input_in_hybridized_block():
    net = _net()
    net.hybridize()
    with pytest.raises(ValueError, match=r"data must be 3-D"):
        with native.translate_errors():
            net(mx.nd.ones((2, 7)))


# ------------------------------------------------------------------ what lib_api cannot do
def test_grad_req_add_is_not_honoured_and_native_ok_refuses_it():
    """MXNet's library API never passes req: grad_req='add' overwrites, it does not add.
    native_ok() is the rule the blocks use to fall back to the CustomOps."""
    inp, conv = conv_inputs(CONV_CASES[0].values[0], np.float64)
    _, dy, grads, _, _ = _reference(inp, conv, use_global_stats=True)
    arrs = _nd(inp, grad_req="add")
    for _ in range(2):
        _run(native.conv1d_bn_relu, arrs, conv, dy, use_global_stats=True)
    # one backward's worth, not two: the accumulation is lost
    assert_close(arrs["weight"].grad.asnumpy(), grads["weight"], np.float64, "dweight")
    # the CustomOp accumulates
    ref = _nd(inp, grad_req="add")
    for _ in range(2):
        _run(fusedres.conv1d_bn_relu, ref, conv, dy, use_global_stats=True)
    assert_close(ref["weight"].grad.asnumpy(), 2 * grads["weight"], np.float64, "dweight x2")

    net = _net()
    assert native_ok_of(net) == (True, "native")
    net.collect_params().setattr("grad_req", "add")
    ok, why = native_ok_of(net)
    assert not ok and "grad_req='add'" in why
    net.collect_params().setattr("grad_req", "write")
    assert not native.native_ok(net.collect_params(), static_alloc=True)[0]
    assert not native.native_ok(net.collect_params(), ctx=mx.gpu(0))[0]


def native_ok_of(net):
    return native.native_ok(net.collect_params(), ctx=mx.cpu())


def test_executor_takes_training_mode_from_bind_time():
    """The legacy GraphExecutor creates op states at bind time, so the native conv runs in the
    mode current then, whatever forward(is_train=...) says (documented limitation)."""
    inp, conv = conv_inputs(CONV_CASES[0].values[0], np.float32)
    names = ["data", "weight", "bias", "gamma", "beta", "running_mean", "running_var"]
    sym = native.conv1d_bn_relu(*[mx.sym.var(n, shape=inp[n].shape) for n in names], **conv)
    y_train, _, _, _, _ = _reference(inp, conv, training=True)
    y_infer, _, _, _, _ = _reference(inp, conv, training=False)
    for train_at_bind, want in [(True, y_train), (False, y_infer)]:
        args = {n: mx.nd.array(inp[n]) for n in names[:5]}
        aux = {n: mx.nd.array(inp[n]) for n in names[5:]}
        with autograd.train_mode() if train_at_bind else autograd.predict_mode():
            ex = sym.bind(mx.cpu(), args, aux_states=aux)
        y = ex.forward(is_train=True)[0]
        assert_close(y.asnumpy(), want, np.float32, f"train_at_bind={train_at_bind}")


def test_executor_backward_is_refused_not_silently_wrong():
    """Training through the legacy executor would run the inference forward: backward says so
    instead of returning gradients of the wrong function."""
    inp, conv = conv_inputs(CONV_CASES[0].values[0], np.float32)
    names = ["data", "weight", "bias", "gamma", "beta", "running_mean", "running_var"]
    sym = native.conv1d_bn_relu(*[mx.sym.var(n, shape=inp[n].shape) for n in names], **conv)
    args = {n: mx.nd.array(inp[n]) for n in names[:5]}
    grads = {n: mx.nd.zeros(inp[n].shape) for n in names[:5]}
    aux = {n: mx.nd.array(inp[n]) for n in names[5:]}
    ex = sym.bind(mx.cpu(), args, args_grad=grads, aux_states=aux)
    ex.forward(is_train=True)
    with pytest.raises(mx.base.MXNetError, match="bound outside autograd"):
        ex.backward(mx.nd.ones(ex.outputs[0].shape))
        mx.nd.waitall()


def test_blocks_fall_back_to_customops_for_grad_req_add():
    """A ConvBNReLU1D whose parameters accumulate gradients runs the CustomOp, which does."""
    from fusedres.nn import ConvBNReLU1D
    blk = ConvBNReLU1D(6, 3, padding=1, in_channels=4)
    blk.initialize()
    blk.collect_params().setattr("grad_req", "add")
    assert blk._impl() is fusedres.ops
    x = mx.nd.random.normal(shape=(2, 4, 11))
    grads = []
    for _ in range(2):
        blk.running_mean.set_data(mx.nd.zeros(6))
        blk.running_var.set_data(mx.nd.ones(6))
        with autograd.record():
            y = blk(x)
        y.backward()
        grads.append(blk.weight.grad().asnumpy().copy())
    assert_close(grads[1], 2 * grads[0], np.float32, "accumulated weight gradient")
    with pytest.raises(ValueError, match="use_native=True but the native ops cannot be used"):
        ConvBNReLU1D(6, 3, use_native=True, in_channels=4, params=blk.collect_params())._impl()


def test_library_load_is_idempotent():
    assert native.load() == native.load() == native.library_path()
    assert os.path.isabs(native.library_path())


def test_blocks_use_customops_for_accumulating_inputs():
    """An input marked with grad_req='add' accumulates: the block picks the CustomOp; an input
    marked 'write' keeps the native op."""
    from fusedres.nn import AddReLU, ConvBNReLU1D
    x0 = mx.nd.random.normal(shape=(2, 4, 9))
    sums = []
    for hybridize in (False, True):
        blk, join = ConvBNReLU1D(4, 3, padding=1, in_channels=4), AddReLU()
        blk.initialize(mx.init.One())
        if hybridize:
            blk.hybridize()
            join.hybridize()
        x = x0.copy()
        x.attach_grad(grad_req="add")
        for _ in range(2):
            with autograd.record():
                y = join(blk(x), x)
            y.backward()
        assert blk._impl() is fusedres.ops
        sums.append(x.grad.asnumpy())
        x1 = x0.copy()
        x1.attach_grad()
        with autograd.record():
            y = join(blk(x1), x1)
        y.backward()
        assert_close(x.grad.asnumpy(), 2 * x1.grad.asnumpy(), np.float32, "accumulated")
        assert blk._impl() is native  # x1 is marked 'write'
        blk._marked_input = fusedres.ops._common.marked_inputs.may_accumulate(x)
        assert blk._impl() is fusedres.ops
    assert_close(sums[1], sums[0], np.float32, "hybridized == imperative")


def test_switching_to_grad_req_add_under_a_native_graph_warns():
    from fusedres.nn import ConvBNReLU1D
    from mxnet.gluon import nn
    net = nn.HybridSequential()
    net.add(ConvBNReLU1D(4, 3, padding=1, in_channels=4))
    net.initialize()
    net.hybridize()
    net(mx.nd.ones((1, 4, 8)))
    with pytest.warns(RuntimeWarning, match="call hybridize\\(\\) again"):
        net.collect_params().setattr("grad_req", "add")
