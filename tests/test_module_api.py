"""The fused ops in the symbolic Module API and in mx.viz.

A residual 1-D net written with Symbols: two conv1d_bn_relu (one through ``mx.sym.Custom``, one
through ``fusedres.conv1d_bn_relu``), an add_relu residual join, FullyConnected and
SoftmaxOutput, trained with ``mx.mod.Module``.

Known MXNet limitation, shown by ``test_default_initializer_on_auto_created_running_stats``:
MXNet's ``Initializer`` picks a rule by the *name* of each array (weight, bias, gamma, beta, ...)
and has none for ``*_running_mean`` / ``*_running_var``; stock BatchNorm's aux states
(``*_moving_mean`` / ``*_moving_var``) get theirs from a backend hook
(``FSetInputVariableAttrs``) that a CustomOp cannot register. So the running statistics of a
fused op must be declared as Variables with an ``init`` (as ``_net`` does here, and
``fusedres.conv1d_bn_relu_symbol`` does) or be passed to ``init_params(aux_params=...)``.

MXNet 1.9.1 trap, not fusedres's: in a bound symbol (``Executor``, ``Module``) a read of a
CustomOp's aux state (``exec.aux_dict[...]``, ``mod.get_params()``, ``save_checkpoint``) does
not wait for a pending CustomOp that updates it, so it can see the running statistics of an
earlier step (any CustomOp with aux states does this; Gluon, imperative or hybridized, does
not). Reading an output of the step first, or ``mx.nd.waitall()``, makes the read current; the
tests here do that before they look at running statistics.
"""
import mxnet as mx
import numpy as np
import pytest

import fusedres

N, C_IN, WIDTH, CHANNELS, CLASSES, BATCH = 64, 4, 16, 8, 3, 16
OP = "fusedres_conv1d_bn_relu"


def _stats(name):
    return (mx.sym.Variable(f"{name}_running_mean", init=mx.init.Zero()),
            mx.sym.Variable(f"{name}_running_var", init=mx.init.One()))


def _net():
    data = mx.sym.Variable("data")
    mean1, var1 = _stats("c1")
    # mx.sym.Custom creates c1_weight, c1_bias, c1_gamma, c1_beta itself.
    c1 = mx.sym.Custom(data=data, running_mean=mean1, running_var=var1, op_type=OP,
                       num_filter=CHANNELS, kernel=3, pad=1, name="c1")
    v = mx.sym.Variable
    mean2, var2 = _stats("c2")
    c2 = fusedres.conv1d_bn_relu(c1, v("c2_weight"), None, v("c2_gamma"), v("c2_beta"),
                                 mean2, var2, kernel=3, num_filter=CHANNELS, pad=1, name="c2")
    join = fusedres.add_relu(c1, c2, name="join")
    fc = mx.sym.FullyConnected(join, num_hidden=CLASSES, name="fc")
    return mx.sym.SoftmaxOutput(fc, name="softmax")


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C_IN, WIDTH)).astype(np.float32)
    # A learnable labelling: the signs of the mean of channels 0 and 1.
    y = ((x[:, 0].mean(1) > 0).astype(np.float32) + (x[:, 1].mean(1) > 0)).astype(np.float32)
    return x, y


def _iter(shuffle=False):
    x, y = _data()
    return mx.io.NDArrayIter(x, y, batch_size=BATCH, shuffle=shuffle,
                             label_name="softmax_label")


def _copy(params):
    return {k: v.asnumpy().copy() for k, v in params.items()}


def test_symbol_lists_fused_arguments_and_aux():
    net = _net()
    assert net.list_arguments() == [
        "data", "c1_weight", "c1_bias", "c1_gamma", "c1_beta", "c2_weight", "c2_gamma",
        "c2_beta", "fc_weight", "fc_bias", "softmax_label"]
    assert net.list_auxiliary_states() == [
        "c1_running_mean", "c1_running_var", "c2_running_mean", "c2_running_var"]
    args, outs, aux = net.infer_shape(data=(BATCH, C_IN, WIDTH))
    assert outs == [(BATCH, CLASSES)]
    assert aux == [(CHANNELS,)] * 4


# fit() calls init_params() again and warns that the parameters are initialized already.
@pytest.mark.filterwarnings("ignore:Parameters already initialized")
def test_module_fit_predict_checkpoint(tmp_path):
    mx.random.seed(0)
    it = _iter()
    mod = mx.mod.Module(_net(), context=mx.cpu(), data_names=["data"],
                        label_names=["softmax_label"])
    mod.bind(data_shapes=it.provide_data, label_shapes=it.provide_label)
    mod.init_params(mx.init.Xavier())
    arg0, aux0 = (_copy(p) for p in mod.get_params())
    # The running statistics start at their declared initial values.
    np.testing.assert_array_equal(aux0["c1_running_mean"], np.zeros(CHANNELS))
    np.testing.assert_array_equal(aux0["c2_running_var"], np.ones(CHANNELS))

    ce0 = dict(mod.score(it, "ce"))["cross-entropy"]
    it.reset()
    mod.fit(it, num_epoch=4, optimizer="sgd",
            optimizer_params={"learning_rate": 0.1, "momentum": 0.9}, eval_metric="ce")
    mx.nd.waitall()  # see the module docstring
    ce1 = dict(mod.score(it, "ce"))["cross-entropy"]
    acc1 = dict(mod.score(it, "acc"))["accuracy"]
    assert ce1 < 0.5 * ce0, (ce0, ce1)
    assert acc1 >= 0.9, acc1

    arg1, aux1 = (_copy(p) for p in mod.get_params())
    for name in arg0:
        assert not np.allclose(arg0[name], arg1[name]), f"{name} did not change"
    # Training forwards update the fused ops' running statistics in place (aux states).
    for name in aux0:
        assert np.max(np.abs(aux1[name] - aux0[name])) > 1e-3, f"{name} did not change"
    assert np.all(aux1["c1_running_var"] > 0) and np.all(aux1["c2_running_var"] > 0)

    pred = mod.predict(it).asnumpy()
    assert pred.shape == (N, CLASSES)
    np.testing.assert_allclose(pred.sum(1), 1, rtol=1e-5)
    # predict() is inference: it normalizes with the running statistics and leaves them be.
    np.testing.assert_array_equal(_copy(mod.get_params()[1])["c1_running_mean"],
                                  aux1["c1_running_mean"])
    # ... and so it is the same as an inference forward by hand on the same batch.
    x, _ = _data()
    batch = mx.io.DataBatch([mx.nd.array(x[:BATCH])])
    mod.forward(batch, is_train=False)
    np.testing.assert_allclose(mod.get_outputs()[0].asnumpy(), pred[:BATCH], rtol=1e-5,
                               atol=1e-7)

    prefix = str(tmp_path / "fused")
    mod.save_checkpoint(prefix, 4)
    sym, args, auxs = mx.model.load_checkpoint(prefix, 4)
    assert sym.tojson() == mod.symbol.tojson()
    assert sorted(auxs) == sorted(aux1)
    for name in aux1:
        np.testing.assert_array_equal(auxs[name].asnumpy(), aux1[name])

    loaded = mx.mod.Module.load(prefix, 4, context=mx.cpu())
    loaded.bind(data_shapes=it.provide_data, label_shapes=it.provide_label,
                for_training=False)
    np.testing.assert_array_equal(loaded.predict(it).asnumpy(), pred)

    # The same through a plain Module fed the loaded parameters.
    again = mx.mod.Module(sym, context=mx.cpu())
    again.bind(data_shapes=it.provide_data, label_shapes=it.provide_label,
               for_training=False)
    again.set_params(args, auxs)
    np.testing.assert_array_equal(again.predict(it).asnumpy(), pred)


@pytest.mark.filterwarnings("ignore:Parameters already initialized")
def test_module_fit_on_two_contexts():
    # The executor group splits each batch over cpu(0) and cpu(1); every device runs the
    # fused ops on its half (its own batch statistics), and get_params() averages the
    # devices' running statistics.
    mx.random.seed(0)
    it = _iter()
    mod = mx.mod.Module(_net(), context=[mx.cpu(0), mx.cpu(1)])
    mod.bind(data_shapes=it.provide_data, label_shapes=it.provide_label)
    mod.init_params(mx.init.Xavier())
    ce0 = dict(mod.score(it, "ce"))["cross-entropy"]
    it.reset()
    mod.fit(it, num_epoch=4, optimizer="sgd",
            optimizer_params={"learning_rate": 0.1, "momentum": 0.9}, eval_metric="ce")
    assert dict(mod.score(it, "ce"))["cross-entropy"] < 0.5 * ce0
    mx.nd.waitall()
    aux = _copy(mod.get_params()[1])
    assert np.max(np.abs(aux["c2_running_mean"])) > 1e-3
    assert mod.predict(it).shape == (N, CLASSES)


def test_default_initializer_on_auto_created_running_stats():
    """MXNet's Initializer has no rule for the running statistics that mx.sym.Custom creates
    (a CustomOp cannot attach an init to them); fusedres.conv1d_bn_relu_symbol declares them
    with theirs, so Module.init_params works with any initializer."""
    data = mx.sym.Variable("data")
    raw = mx.sym.Custom(data, op_type=OP, num_filter=CHANNELS, kernel=3, pad=1, name="c1")
    declared = fusedres.conv1d_bn_relu_symbol(data, num_filter=CHANNELS, kernel=3, pad=1,
                                              name="c1")
    for c1, works in ((raw, False), (declared, True)):
        net = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(c1, num_hidden=CLASSES, name="fc"),
                                   name="softmax")
        assert net.list_auxiliary_states() == ["c1_running_mean", "c1_running_var"]
        mod = mx.mod.Module(net, context=mx.cpu())
        mod.bind(data_shapes=[("data", (BATCH, C_IN, WIDTH))],
                 label_shapes=[("softmax_label", (BATCH,))])
        if not works:
            with pytest.raises(ValueError, match="Unknown initialization pattern for "
                                                 "c1_running_mean"):
                mod.init_params(mx.init.Xavier())
            continue
        mod.init_params(mx.init.Xavier())
        aux = mod.get_params()[1]
        np.testing.assert_array_equal(aux["c1_running_var"].asnumpy(), 1)
        np.testing.assert_array_equal(aux["c1_running_mean"].asnumpy(), 0)


def test_auto_created_running_stats_work_with_explicit_aux_params():
    # The workaround for the limitation above: hand init_params the running statistics.
    data = mx.sym.Variable("data")
    c1 = mx.sym.Custom(data, op_type=OP, num_filter=CHANNELS, kernel=3, pad=1, name="c1")
    net = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(c1, num_hidden=CLASSES, name="fc"),
                               name="softmax")
    mod = mx.mod.Module(net, context=mx.cpu())
    mod.bind(data_shapes=[("data", (BATCH, C_IN, WIDTH))],
             label_shapes=[("softmax_label", (BATCH,))])
    mod.init_params(mx.init.Xavier(),
                    aux_params={"c1_running_mean": mx.nd.zeros(CHANNELS),
                                "c1_running_var": mx.nd.ones(CHANNELS)})
    mod.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.1})
    x, y = _data()
    mod.forward_backward(mx.io.DataBatch([mx.nd.array(x[:BATCH])], [mx.nd.array(y[:BATCH])]))
    mod.update()
    mx.nd.waitall()  # see the module docstring: without it this read is stale
    aux = _copy(mod.get_params()[1])
    assert np.max(np.abs(aux["c1_running_var"] - 1)) > 1e-3


def test_plot_network_shows_fused_nodes():
    pytest.importorskip("graphviz")
    graph = mx.viz.plot_network(_net(), shape={"data": (BATCH, C_IN, WIDTH)},
                                node_attrs={"fixedsize": "false"})
    src = graph.source  # the DOT text; rendering it would need the `dot` binary
    # c1 is a bare mx.sym.Custom (labelled by its op_type); c2 and the join are the MXNet
    # operators the functional forms use on the CPU.
    assert "c1 [label=fusedres_conv1d_bn_relu" in src
    for node in ("c1", "c2", "join", "fc", "softmax"):
        assert f"\t{node} [" in src, node
    # Edges carry the inferred shapes (channels x width, batch left out).
    assert "c2 -> c1 [label=\"8x16\"" in src
    assert "join -> c1 [label=\"8x16\"" in src and "join -> c2 [label=\"8x16\"" in src
    assert "c1 -> data [label=\"4x16\"" in src
    # Weights and running statistics are hidden like stock ops' (hide_weights=True).
    assert "c1_weight" not in src and "running_mean" not in src


def test_print_summary_with_fused_ops(capsys):
    mx.viz.print_summary(_net(), shape={"data": (BATCH, C_IN, WIDTH)})
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line and line.split()[0].endswith(")") and "(" in line.split()[0]}
    # It runs, lists the fused nodes with their output shapes and inputs...
    assert rows["c1(Custom)"][1:] == ["8x16", "0", "data"]
    assert rows["c2(_fusedres_conv1d_bn_relu)"][1:] == ["8x16", "0", "c1"]
    assert rows["join(_fusedres_add_relu)"][1:] == ["8x16", "0", "c1"]
    # ...but MXNet's print_summary counts parameters only for the op types it knows
    # (Convolution, FullyConnected, BatchNorm, ...): a fused op's parameters are reported as
    # 0, so the total leaves them out. (The FullyConnected is counted from its input's first
    # non-batch dimension, (8 + 1) * 3 = 27 rather than (8 * 16 + 1) * 3: print_summary does
    # that after a stock Convolution too.)
    assert rows["fc(FullyConnected)"][1:3] == ["3", "27"]
    assert "Total params: 27" in out
