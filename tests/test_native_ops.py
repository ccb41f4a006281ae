"""What is particular to the MXNet operators (fusedres.ops.native, csrc/mxop): registration in
libmxnet's own registry, the ABI check that guards it, MXNet's full operator contract where the
old external-library API had holes (req in every executor, is_train under Symbol.bind / Module),
export and import in a fresh process. The arithmetic of both implementations is in test_ops.py,
their combinations in test_matrix.py."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from helpers import CONV_CASES, GRAD_NAMES, assert_close, conv_inputs, reference_step
from mxnet import autograd

import fusedres
from fusedres.nn import AddReLU, ConvBNReLU1D
from fusedres.ops import dispatch, native

OK, WHY = native.available()
if not OK:
    # Built with fusedres wherever it is installed (the build requires MXNet): a missing or
    # refused library is a build problem to report, not a reason to skip.
    pytest.fail(f"the MXNet operators are unavailable: {WHY}", pytrace=False)

OPS = [native.CONV1D_BN_RELU, "_backward_fusedres_conv1d_bn_relu", native.ADD_RELU,
       "_backward_fusedres_add_relu", native.LAYOUT_COPY]


def test_ops_are_in_mxnets_registry():
    listed = mx.base.mx_uint()
    names = mx.base.ctypes.POINTER(mx.base.ctypes.c_char_p)()
    mx.base.check_call(mx.base._LIB.MXListAllOpNames(mx.base.ctypes.byref(listed),
                                                     mx.base.ctypes.byref(names)))
    registered = {mx.base.py_str(names[i]) for i in range(listed.value)}
    assert set(OPS) <= registered
    assert native.load() == native.load() == native.library_path()
    assert hasattr(mx.nd._internal, native.CONV1D_BN_RELU)
    assert hasattr(mx.sym._internal, native.ADD_RELU)


def test_abi_check_covers_every_libmxnet_symbol_the_library_uses():
    """native._REQUIRED_SYMBOLS must list each symbol the library takes from libmxnet, so the
    check before loading sees a libmxnet built otherwise (a new-ABI build lacks them)."""
    out = subprocess.run(["nm", "-D", "--undefined-only", native.library_path()],
                         capture_output=True, text=True, check=True).stdout
    used = {line.split()[-1] for line in out.splitlines()
            if any(ns in line for ns in ("mxnet", "nnvm", "dmlc"))}
    assert used == set(native._REQUIRED_SYMBOLS)
    path, legacy = native.libmxnet_abi()
    assert path == mx.base._LIB._name and legacy  # PyPI's libmxnet: GCC 4.8


def test_library_needs_no_newer_libstdcxx_than_manylinux2014():
    """The library shares the libstdc++ libmxnet loads, which on CentOS 7 (manylinux2014) is
    GCC 4.8's: nothing newer than GLIBCXX_3.4.19 / CXXABI_1.3.7 (tools/check_libstdcxx.py; the
    wheel build runs the same check on its zig-built copy)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        import check_libstdcxx
    finally:
        sys.path.pop(0)
    assert check_libstdcxx.too_new(native.library_path(),
                                   check_libstdcxx.default_libstdcxx()) == []
    # and the check sees what it must: this machine's libstdc++ itself is newer
    assert check_libstdcxx.defined_versions(check_libstdcxx.default_libstdcxx())[
        "_ZNSt19basic_ostringstreamIcSt11char_traitsIcESaIcEEC1Ev"][0] > ("GLIBCXX", (3, 4, 19))


def test_abi_check_refuses_a_libmxnet_built_otherwise(monkeypatch):
    monkeypatch.setattr(native, "_REQUIRED_SYMBOLS",
                        native._REQUIRED_SYMBOLS + ("_ZN4nnvm2Op11no_such_thingEv",))
    with pytest.raises(RuntimeError, match="does not export _ZN4nnvm2Op11no_such_thingEv.*"
                                           "old C.. string ABI"):
        native.libmxnet_abi()
    monkeypatch.setattr(native, "_elf_comment", lambda path: b"")
    monkeypatch.setattr(native, "_REQUIRED_SYMBOLS", ())
    with pytest.raises(RuntimeError, match="does not say which compiler built it"):
        native.libmxnet_abi()


def test_unavailable_library_falls_back_to_the_customops(tmp_path):
    """Without the operators (here: no library file) the blocks say so once and run the
    CustomOps, with the same results; python -m fusedres reports it."""
    script = textwrap.dedent("""
        import warnings, numpy as np, mxnet as mx
        from mxnet import autograd
        import fusedres
        from fusedres.nn import ConvBNReLU1D
        from fusedres.ops import native
        ok, why = native.available()
        assert not ok and "does not exist" in why, why
        assert not hasattr(mx.nd._internal, native.CONV1D_BN_RELU)
        blk = ConvBNReLU1D(4, 3, padding=1, in_channels=3)
        blk.initialize()
        x = mx.nd.ones((2, 3, 9))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with autograd.record():
                y = blk(x)
            y.backward()
        assert any("unavailable" in str(m.message) for m in w), [str(m.message) for m in w]
        assert y.shape == (2, 4, 9) and np.isfinite(blk.weight.grad().asnumpy()).all()
        # The CustomOps' guards without the operator library (slice_axis) still keep MKLDNN's
        # freed temporaries away: a global pooling head, hybridized.
        for it in range(20):
            net = mx.gluon.nn.HybridSequential()
            net.add(ConvBNReLU1D(16, 3, padding=1, in_channels=16),
                    mx.gluon.nn.GlobalAvgPool1D(), mx.gluon.nn.Dense(3, in_units=16))
            net.initialize()
            net.hybridize()
            x = mx.nd.random.normal(shape=(4, 16, 64))
            x.attach_grad()
            grads = []
            for _ in range(2):
                with autograd.record():
                    out = net(x)
                out.backward()
                grads.append(x.grad.asnumpy().copy())
            assert np.isfinite(grads[0]).all() and np.abs(grads[0]).max() < 1e3, it
            np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)
        print("ok")
    """)
    env = dict(os.environ, FUSEDRES_MXOP_LIB=str(tmp_path / "missing.so"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
    res = subprocess.run([sys.executable, "-m", "fusedres", "tiny"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert "MXNet operators: UNAVAILABLE" in res.stdout, res.stdout + res.stderr
    assert "INCOMPLETE INSTALL: MXNet operators missing" in res.stdout


def test_nothing_of_mxnet_is_patched():
    """The old design wrapped NDArray.attach_grad to guess an input's grad_req (keyed by an
    address MXNet reuses): the operators now get req from MXNet, and MXNet stays as it is."""
    assert not getattr(mx.nd.NDArray.attach_grad, "_fusedres_wrapped", False)
    assert mx.nd.NDArray.attach_grad.__module__ == "mxnet.ndarray.ndarray"


def test_dispatch_truth_table(monkeypatch):
    cpu, gpu = mx.cpu(), mx.gpu(0)
    monkeypatch.setattr(dispatch, "_mxnet_has_cuda", lambda: False)
    table = {(None, cpu): native, (None, gpu): fusedres.ops.custom, (None, None): native,
             (False, cpu): fusedres.ops.custom, (True, cpu): native, (True, None): native}
    for (use_native, ctx), want in table.items():
        assert dispatch.choose(use_native, ctx) is want, (use_native, ctx)
    with pytest.raises(ValueError, match="use_native=True but data is on gpu"):
        dispatch.choose(True, gpu)
    # An MXNet with CUDA: a Symbol's device is unknown until bound, so the portable CustomOp.
    monkeypatch.setattr(dispatch, "_mxnet_has_cuda", lambda: True)
    assert dispatch.choose(None, None) is fusedres.ops.custom
    assert dispatch.choose(None, cpu) is native
    monkeypatch.setenv("FUSEDRES_NATIVE", "0")
    assert dispatch.choose(None, cpu) is fusedres.ops.custom


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32"])
def test_layout_copy_guard(dtype):
    """The CustomOps' guard: a copy (never in place), shapes inferred both ways, the head
    gradient passed through with req honoured."""
    op = getattr(mx.nd._internal, native.LAYOUT_COPY)
    x = mx.nd.array(np.arange(12).reshape(3, 4), dtype=dtype)
    y = op(x)
    assert y.dtype == x.dtype and y.handle.value != x.handle.value
    np.testing.assert_array_equal(y.asnumpy(), x.asnumpy())
    sym = getattr(mx.sym._internal, native.LAYOUT_COPY)(mx.sym.var("a"))
    assert sym.infer_shape(a=(2, 5))[1] == [(2, 5)]
    both = mx.sym.elemwise_add(sym, mx.sym.var("b"))
    assert both.infer_shape(b=(2, 5))[0] == [(2, 5), (2, 5)]  # the input's, from the output
    if dtype in ("float32", "float64"):
        x.attach_grad("add")
        for _ in range(2):
            with autograd.record():
                y = op(x) * 3
            y.backward()
        np.testing.assert_array_equal(x.grad.asnumpy(), np.full((3, 4), 6.0))


# ------------------------------------------------------------------ Symbol.bind and Module
def _bound(inp, conv, grad_req="write"):
    names = ["data", "weight", "bias", "gamma", "beta"]
    sym = fusedres.conv1d_bn_relu(*(mx.sym.var(n) for n in names + ["running_mean",
                                                                    "running_var"]),
                                  name="c", use_native=True, **conv)
    args = {n: mx.nd.array(inp[n], dtype=inp[n].dtype) for n in names}
    grads = {n: mx.nd.zeros(inp[n].shape, dtype=inp[n].dtype) for n in names}
    aux = {n: mx.nd.array(inp[n], dtype=inp[n].dtype) for n in ("running_mean", "running_var")}
    return sym.bind(mx.cpu(), args, args_grad=grads, grad_req=grad_req, aux_states=aux), grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_executor_honours_is_train_of_each_forward(dtype):
    """Bound once, run in training and in inference alternately (as Module does for a
    validation pass): each forward computes its mode, and only training moves the stats."""
    inp, conv = conv_inputs(CONV_CASES[2].values[0], dtype, seed=21)
    y_train, dy, grads, rm, rv = reference_step(inp, conv, is_train=True)
    y_infer = reference_step(inp, conv, is_train=False)[0]
    ex, g = _bound(inp, conv)
    for _ in range(2):
        ex.aux_dict["running_mean"][:] = inp["running_mean"]
        ex.aux_dict["running_var"][:] = inp["running_var"]
        assert_close(ex.forward(is_train=False)[0].asnumpy(), y_infer, dtype, "inference")
        np.testing.assert_array_equal(ex.aux_dict["running_mean"].asnumpy(),
                                      inp["running_mean"])
        assert_close(ex.forward(is_train=True)[0].asnumpy(), y_train, dtype, "training")
        ex.backward(mx.nd.array(dy, dtype=dtype))
        mx.nd.waitall()
        for n in GRAD_NAMES:
            assert_close(g[n].asnumpy(), grads[n], dtype, f"{n} gradient")
        assert_close(ex.aux_dict["running_mean"].asnumpy(), rm, dtype, "running_mean")
        assert_close(ex.aux_dict["running_var"].asnumpy(), rv, dtype, "running_var")


def test_executor_grad_req_add_accumulates():
    inp, conv = conv_inputs(CONV_CASES[0].values[0], np.float64, seed=22)
    _, dy, grads, _, _ = reference_step(inp, conv)
    ex, g = _bound(inp, conv, grad_req="add")
    for _ in range(3):
        ex.aux_dict["running_mean"][:] = inp["running_mean"]
        ex.aux_dict["running_var"][:] = inp["running_var"]
        ex.forward(is_train=True)
        ex.backward(mx.nd.array(dy, dtype=np.float64))
    mx.nd.waitall()
    for n in GRAD_NAMES:
        assert_close(g[n].asnumpy(), 3 * grads[n], np.float64, f"{n} gradient x3")


# ------------------------------------------------------------------ export, fresh process
def test_export_and_import_in_fresh_process(tmp_path):
    mx.random.seed(5)
    net = mx.gluon.nn.HybridSequential()
    net.add(ConvBNReLU1D(7, 3, padding=1, in_channels=7, use_bias=False),
            ConvBNReLU1D(7, 3, padding=1, in_channels=7))
    join = AddReLU()
    net.initialize(mx.init.Normal(0.3))
    outer = mx.gluon.nn.HybridSequential()
    outer.add(net)
    outer.hybridize()
    x = mx.nd.array(np.random.default_rng(5).standard_normal((3, 7, 41)))
    with autograd.record():  # move the running statistics off their init
        outer(x).backward()
    y = join(outer(x), x).asnumpy()
    prefix = str(tmp_path / "native_net")
    outer.export(prefix)
    with open(prefix + "-symbol.json") as f:
        graph = f.read()
    assert native.CONV1D_BN_RELU in graph and "Custom" not in graph
    np.save(tmp_path / "x.npy", x.asnumpy())
    np.save(tmp_path / "y.npy", y)
    script = textwrap.dedent(f"""
        import numpy as np, mxnet as mx
        try:
            mx.gluon.SymbolBlock.imports({prefix!r} + "-symbol.json", ["data"],
                                         {prefix!r} + "-0000.params")
            raise SystemExit("imported without fusedres")
        except mx.base.MXNetError:
            pass
        import fusedres
        net = mx.gluon.SymbolBlock.imports({prefix!r} + "-symbol.json", ["data"],
                                           {prefix!r} + "-0000.params")
        net.hybridize()
        x = mx.nd.array(np.load({str(tmp_path / 'x.npy')!r}))
        y = fusedres.add_relu(net(x), x).asnumpy()
        err = np.abs(y - np.load({str(tmp_path / 'y.npy')!r})).max()
        assert err < 1e-5, err
        print("ok", err)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_symbol_api_names_and_partial_shapes():
    names = ["data", "w", "b", "g", "be", "rm", "rv"]
    shapes = dict(data=(2, 7, 97), w=(7, 7, 3), b=(7,), g=(7,), be=(7,), rm=(7,), rv=(7,))
    vars_ = [mx.sym.var(n, shape=shapes[n]) for n in names]
    sym = fusedres.conv1d_bn_relu(*vars_, kernel=3, num_filter=7, pad=1, use_native=True)
    assert sym.list_arguments() == names[:5]
    assert sym.list_auxiliary_states() == ["rm", "rv"]
    _, out, aux = sym.infer_shape()
    assert out == [(2, 7, 97)] and aux == [(7,), (7,)]
    # From the data's shape alone.
    bare = fusedres.conv1d_bn_relu_symbol(mx.sym.var("data"), num_filter=5, kernel=3,
                                          name="c", no_bias=True, use_native=True)
    assert bare.list_arguments() == ["data", "c_weight", "c_gamma", "c_beta"]
    args, out, _ = bare.infer_shape(data=(2, 3, 11))
    assert args[1] == (5, 3, 3) and out == [(2, 5, 9)]
