"""The ops' GPU path from MXNet down to the CUDA kernels, without an MXNet GPU build: the GPU
backend (fusedres.ops.backends.GPUBackend, fusedres.cuda.from_mxnet and mxnet_scope), the
CustomOps on it (req write/add/null, auxiliary states, float16 data with float32 BatchNorm
arrays) and the fused blocks end to end, against the numpy reference. CPU NDArrays stand in
for GPU ones and the kernels run on the CUDA emulation (tests/cuda_emu/mxnet_gpu.py), in its
plain schedule (tests/test_cuda_kernels.py runs the kernels themselves in both)."""
import mxnet as mx
import numpy as np
import pytest
from helpers import (MOMENTUM, ConvCase, assert_close, away_from_kink, conv_inputs, nd_inputs,
                      reference_step, run_step)
from cuda_emu import fake_cupy
from cuda_emu.mxnet_gpu import cpu_as_gpu
from mxnet import autograd

import fusedres
from fusedres import cuda
from fusedres import reference as R
from fusedres.nn import AddReLU, ConvBN1D, ConvBNReLU1D, ResidualBlock1D
from fusedres.ops import backends


@pytest.fixture
def gpu():
    """The GPU backend on CPU NDArrays; yields the CuPy stand-in."""
    with cpu_as_gpu() as cp:
        yield cp


# ---------------------------------------------------------------------------------------------
# The seams: device dispatch, DLPack views, the scope


def test_without_the_hook_cpu_arrays_stay_on_the_cpu():
    with fake_cupy.installed():
        assert isinstance(backends.backend_for(mx.cpu()), backends.CPUBackend)
        with pytest.raises(ValueError, match=r"from_mxnet needs a GPU NDArray, got one on "
                                             r"cpu\(0\)"):
            cuda.from_mxnet(mx.nd.ones(3))


def test_backend_for_gives_gpus_the_gpu_backend(gpu):
    for ctx in (mx.gpu(1), mx.cpu(1)):
        be = backends.backend_for(ctx)
        assert isinstance(be, backends.GPUBackend) and be.ctx == ctx and be.name == "gpu"
        buf = be.empty((2, 3), np.float16)
        assert buf.device.id == 1 and buf.dtype == np.float16 and buf.shape == (2, 3)

    class Tpu:
        device_type, device_id = "tpu", 0

        def __str__(self):
            return "tpu(0)"

    with pytest.raises(ValueError, match=r"data is on an unsupported device tpu\(0\)"):
        backends.backend_for(Tpu())


def test_gpu_backend_without_a_device_names_why(gpu, monkeypatch):
    monkeypatch.setattr(gpu.config, "device_count", 0)
    with pytest.raises(ValueError, match=r"data is on gpu\(0\) but fusedres's CUDA kernels are "
                                         r"unavailable: no CUDA device"):
        backends.backend_for(mx.gpu(0))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_from_mxnet_views_the_ndarray_without_a_copy(gpu, dtype):
    a = mx.nd.arange(6, ctx=mx.cpu(1), dtype=dtype).reshape((2, 3))
    b = a * 2  # a pending write: the read export waits for it
    view = cuda.from_mxnet(b)
    assert isinstance(view, gpu.ndarray) and view.device.id == 1
    assert view.dtype == np.dtype(dtype) and view.shape == (2, 3)
    np.testing.assert_array_equal(gpu.asnumpy(view), np.arange(6).reshape(2, 3) * 2)
    out = cuda.from_mxnet(a, writable=True)
    out[0, 1] = 7  # written in place: MXNet sees it
    assert a.asnumpy()[0, 1] == 7
    del view, out  # the DLPack deleters run


def test_mxnet_scope_selects_the_device_and_synchronizes(gpu, monkeypatch):
    synced = []

    class Stream:
        def synchronize(self):
            synced.append(gpu.cuda.Device().id)

    monkeypatch.setattr(gpu.cuda, "get_current_stream", Stream)
    with cuda.mxnet_scope(mx.gpu(1)):
        assert gpu.cuda.Device().id == 1
    assert synced == [1] and gpu.cuda.Device().id == 0
    with pytest.raises(RuntimeError, match="kernel failed"):
        with cuda.mxnet_scope(mx.gpu(1)):
            raise RuntimeError("kernel failed")
    assert synced == [1, 1]  # synchronized on the way out of a failure too


def test_gpu_kernels_take_float32_and_float16_only(gpu):
    x = mx.nd.ones((2, 3, 8), dtype="float64")
    w = mx.nd.ones((4, 3, 3), dtype="float64")
    c = mx.nd.ones((4,), dtype="float64")
    with pytest.raises(TypeError, match="data must be float32 or float16 on a GPU, got float64"):
        fusedres.conv1d_bn_relu(x, w, c, c, c, c, c, kernel=3, num_filter=4, use_native=False)
    with pytest.raises(TypeError, match="lhs must be float32 or float16 on a GPU, got float64"):
        fusedres.add_relu(c, c, use_native=False)


# ---------------------------------------------------------------------------------------------
# The CustomOps on the GPU backend: req, auxiliary states, training and inference

CASES = {"c7": ConvCase(2, 7, 97, 7, 3, 1, 1, 1, 1, True),
         "stride2": ConvCase(2, 6, 41, 10, 3, 2, 1, 1, 1, True),
         "groups2": ConvCase(2, 8, 29, 6, 5, 1, 2, 1, 2, True),
         "no_bias_dilation2": ConvCase(2, 5, 37, 7, 3, 1, 2, 2, 1, False),
         # the depthwise kernels (one input channel per group, at most 8 outputs per group)
         "depthwise": ConvCase(2, 5, 33, 5, 3, 1, 1, 1, 5, True),
         "depthwise_mult2_stride2": ConvCase(2, 4, 29, 8, 3, 2, 1, 1, 4, True)}
# name: (autograd's train_mode, use_global_stats): batch statistics; running statistics in
# training; an inference-mode forward (the backward then recomputes with running statistics).
MODES = {"batch_stats": (True, False), "global_stats": (True, True), "inference": (False, False)}


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_conv1d_bn_relu(gpu, case, mode, relu):
    train_mode, use_global_stats = MODES[mode]
    inp, conv = conv_inputs(CASES[case], np.float32)
    training = train_mode and not use_global_stats
    y_ref, dy, grads, rm, rv = reference_step(inp, conv, is_train=train_mode,
                                              use_global_stats=use_global_stats, relu=relu)
    arrs = nd_inputs(inp)
    y = run_step(fusedres.conv1d_bn_relu, arrs, conv, dy, train_mode=train_mode,
                 use_global_stats=use_global_stats, relu=relu, use_native=False)
    assert_close(y.asnumpy(), y_ref, np.float32, "output")
    for k, g in grads.items():
        if g is not None:
            assert_close(arrs[k].grad.asnumpy(), g, np.float32, f"{k} gradient")
    assert_close(arrs["running_mean"].asnumpy(), rm, np.float32, "running_mean")
    assert_close(arrs["running_var"].asnumpy(), rv, np.float32, "running_var")
    if not training:  # the running statistics are only read
        np.testing.assert_array_equal(arrs["running_mean"].asnumpy(), inp["running_mean"])


def test_conv1d_bn_relu_req_add_and_null(gpu):
    """grad_req 'add' accumulates over two steps (inputs and parameters); a gradient that is
    not wanted (req 'null': data without attach_grad, a frozen gamma) is not computed."""
    inp, conv = conv_inputs(CASES["groups2"], np.float32)
    y_ref, dy, grads, rm, rv = reference_step(inp, conv)
    arrs = nd_inputs(inp, grad_req="add")
    for _ in range(2):
        run_step(fusedres.conv1d_bn_relu, arrs, conv, dy, use_native=False)
    for k, g in grads.items():
        assert_close(arrs[k].grad.asnumpy(), 2 * g, np.float32, f"{k} gradient, accumulated")
    _, _, _, rm2, rv2 = reference_step(dict(inp, running_mean=rm, running_var=rv), conv)
    assert_close(arrs["running_mean"].asnumpy(), rm2, np.float32, "running_mean, two updates")
    assert_close(arrs["running_var"].asnumpy(), rv2, np.float32, "running_var, two updates")
    arrs = nd_inputs(inp)
    arrs["data"] = mx.nd.array(inp["data"])
    arrs["gamma"].attach_grad("null")
    run_step(fusedres.conv1d_bn_relu, arrs, conv, dy, use_native=False)
    for k in ("weight", "bias", "beta"):
        assert_close(arrs[k].grad.asnumpy(), grads[k], np.float32, f"{k} gradient")
    assert arrs["data"].grad is None


@pytest.mark.parametrize("case", ["c7", "depthwise_mult2_stride2"])
def test_conv1d_bn_relu_float16_with_float32_batchnorm_arrays(gpu, case):
    inp, conv = conv_inputs(CASES[case], np.float16)
    for k in ("gamma", "beta", "running_mean", "running_var"):
        inp[k] = inp[k].astype(np.float32)
    f64 = {k: v.astype(np.float64) for k, v in inp.items()}
    y_ref, cache, rm, rv = R.conv1d_bn_relu_forward(
        f64["data"], f64["weight"], f64["bias"], f64["gamma"], f64["beta"], f64["running_mean"],
        f64["running_var"], conv["stride"], conv["pad"], conv["dilate"], conv["num_group"], 1e-5,
        MOMENTUM)
    dy = away_from_kink(np.random.default_rng(1).standard_normal(y_ref.shape), cache["pre"],
                        margin=5e-2)
    grads = R.conv1d_bn_relu_backward(dy, cache)
    arrs = nd_inputs(inp)
    y = run_step(fusedres.conv1d_bn_relu, arrs, conv, dy, use_native=False)
    assert y.dtype == np.float16
    assert_close(y.asnumpy(), y_ref, np.float16, "output")
    for k, g in grads.items():
        want = np.float32 if k in ("gamma", "beta") else np.float16
        assert arrs[k].grad.dtype == want
        assert_close(arrs[k].grad.asnumpy(), g, np.float16, f"{k} gradient")
    assert arrs["running_mean"].dtype == np.float32
    assert_close(arrs["running_mean"].asnumpy(), rm, np.float16, "running_mean")
    assert_close(arrs["running_var"].asnumpy(), rv, np.float16, "running_var")
    with autograd.record(train_mode=False):  # the inference kernel
        y = fusedres.conv1d_bn_relu(*(arrs[k] for k in ("data", "weight", "bias", "gamma", "beta",
                                                        "running_mean", "running_var")),
                                    use_native=False, **conv)
    y_ref = R.conv1d_bn_relu_forward(
        f64["data"], f64["weight"], f64["bias"], f64["gamma"], f64["beta"], rm, rv,
        conv["stride"], conv["pad"], conv["dilate"], conv["num_group"], 1e-5, is_train=False)[0]
    assert_close(y.asnumpy(), y_ref, np.float16, "inference output")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("req", ["write", "add"])
def test_add_relu(gpu, dtype, req):
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((3, 8, 33)).astype(dtype) for _ in range(2))
    y_ref = R.add_relu_forward(a.astype(np.float64), b)
    dy = away_from_kink(rng.standard_normal(a.shape), a.astype(np.float64) + b, 5e-2)
    ga, _ = R.add_relu_backward(dy, y_ref)
    lhs, rhs = mx.nd.array(a, dtype=dtype), mx.nd.array(b, dtype=dtype)
    lhs.attach_grad(req)
    rhs.attach_grad(req)
    steps = 2 if req == "add" else 1
    for _ in range(steps):
        with autograd.record():
            y = fusedres.add_relu(lhs, rhs, use_native=False)
        y.backward(mx.nd.array(dy, dtype=dtype))
    assert y.dtype == dtype
    assert_close(y.asnumpy(), y_ref, dtype, "output")
    assert_close(lhs.grad.asnumpy(), steps * ga, dtype, "lhs gradient")
    assert_close(rhs.grad.asnumpy(), steps * ga, dtype, "rhs gradient")
    rhs = mx.nd.array(b, dtype=dtype)  # no gradient wanted: req 'null'
    with autograd.record():
        y = fusedres.add_relu(lhs, rhs, use_native=False)
    y.backward(mx.nd.array(dy, dtype=dtype))
    assert_close(lhs.grad.asnumpy(), (steps + (req == "add")) * ga, dtype, "lhs gradient")


def test_outputs_not_wanted_are_not_computed(gpu):
    """req 'null' on the output (MXNet's executors ask so for outputs nobody reads): the
    CustomOps compute and write nothing."""
    from fusedres.ops.add_relu import AddReLUCustomOpProp
    from fusedres.ops.conv1d_bn_relu import ConvBNReLUCustomOpProp
    f32 = 0  # MXNet's type id of float32, as create_operator receives it
    a, out = mx.nd.ones((2, 3)), mx.nd.full((2, 3), 5)
    op = AddReLUCustomOpProp().create_operator(mx.cpu(), [[2, 3], [2, 3]], [f32, f32])
    assert op.backend.name == "gpu"
    op.forward(True, ["null"], [a, a], [out], [])
    prop = ConvBNReLUCustomOpProp(kernel="3", num_filter="4")
    op = prop.create_operator(mx.cpu(), [[2, 3, 8], [4, 3, 3]] + [[4]] * 3, [f32] * 5)
    x, w, c = mx.nd.ones((2, 3, 8)), mx.nd.ones((4, 3, 3)), mx.nd.ones((4,))
    y = mx.nd.full((2, 4, 6), 5)
    op.forward(True, ["null"], [x, w, c, c, c], [y], [c, c])
    mx.nd.waitall()
    assert (out.asnumpy() == 5).all() and (y.asnumpy() == 5).all() and op.saved is None


# ---------------------------------------------------------------------------------------------
# The fused blocks' GPU path end to end: two training steps with grad_req 'add' on parameters
# and input, then inference, imperative and hybridized, float32 and float16 (Gluon's
# cast('float16'): float32 BatchNorm parameters), against a float64 reference of the block.


class RefConv:
    """The reference of a ConvBNReLU1D / ConvBN1D: forward, backward, accumulated gradients and
    running statistics, from the block's parameters."""

    def __init__(self, blk):
        self.blk = blk
        self.p = {n: (getattr(blk, n).data().asnumpy().astype(np.float64)
                      if getattr(blk, n) is not None else None)
                  for n in ("weight", "bias", "gamma", "beta", "running_mean", "running_var")}
        self.grads = {}

    def forward(self, x, training):
        a, p = self.blk._attrs, self.p
        self.y, self.cache, rm, rv = R.conv1d_bn_relu_forward(
            x, p["weight"], p["bias"], p["gamma"], p["beta"], p["running_mean"],
            p["running_var"], a.stride, a.pad, a.dilate, a.num_group, a.eps, a.momentum,
            is_train=training, use_global_stats=a.use_global_stats, relu=a.relu)
        if training:
            p["running_mean"], p["running_var"] = rm, rv
        return self.y

    def pre(self):
        return self.cache["pre"]

    def backward(self, dy):
        g = R.conv1d_bn_relu_backward(dy, self.cache)
        for k in ("weight", "bias", "gamma", "beta"):
            if g[k] is not None:
                self.grads[k] = self.grads.get(k, 0) + g[k]
        return g["data"]

    def check(self, dtype):
        for k, g in self.grads.items():
            assert_close(getattr(self.blk, k).grad().asnumpy(), g, dtype,
                         f"{self.blk.name} {k} gradient")
        for k in ("running_mean", "running_var"):
            assert_close(getattr(self.blk, k).data().asnumpy(), self.p[k], dtype,
                         f"{self.blk.name} {k}")


class RefAdd:
    def forward(self, a, b):
        self.a_plus_b = a + b
        self.y = R.add_relu_forward(a, b)
        return self.y

    def pre(self):
        return self.a_plus_b

    def backward(self, dy):
        return R.add_relu_backward(dy, self.y)

    def check(self, dtype):
        pass


class RefResidual:
    """relu(body(x) + shortcut(x)), as ResidualBlock1D composes them."""

    def __init__(self, blk):
        self.body = [RefConv(c) for c in blk.body]
        self.shortcut = RefConv(blk.shortcut) if blk.shortcut is not None else None
        self.join = RefAdd()

    def forward(self, x, training):
        h = x
        for c in self.body:
            h = c.forward(h, training)
        skip = self.shortcut.forward(x, training) if self.shortcut else x
        return self.join.forward(h, skip)

    def pre(self):
        return self.join.pre()

    def inner_pre(self):
        return [c.pre() for c in self.body if c.blk._attrs.relu]

    def backward(self, dy):
        g, g_skip = self.join.backward(dy)
        for c in reversed(self.body):
            g = c.backward(g)
        return g + (self.shortcut.backward(g_skip) if self.shortcut else g_skip)

    def check(self, dtype):
        for c in self.body + ([self.shortcut] if self.shortcut else []):
            c.check(dtype)


def _make_block(kind):
    """(block, number of inputs) with random parameters, on the CustomOps."""
    if kind == "AddReLU":
        return AddReLU(use_native=False), 2
    if kind == "ResidualBlock1D":  # its convs choose their implementation: FUSEDRES_NATIVE=0
        blk = ResidualBlock1D(6, 3, chain_length=2, in_channels=4)
    else:
        cls = ConvBNReLU1D if kind == "ConvBNReLU1D" else ConvBN1D
        blk = cls(6, 3, strides=2, padding=1, in_channels=4, use_native=False)
    blk.initialize()
    rng = np.random.default_rng(7)
    for p in blk.collect_params().values():
        if p.name.endswith(("running_var", "gamma")):
            p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, p.shape)))
        else:
            p.set_data(mx.nd.array(rng.standard_normal(p.shape) * 0.3))
    return blk, 1


def _reference(kind, blk):
    if kind == "AddReLU":
        return RefAdd()
    return RefResidual(blk) if kind == "ResidualBlock1D" else RefConv(blk)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("kind", ["ConvBNReLU1D", "ConvBN1D", "AddReLU", "ResidualBlock1D"])
def test_block_gpu_path(gpu, monkeypatch, kind, hybridize, dtype):
    monkeypatch.setenv("FUSEDRES_NATIVE", "0")
    blk, n_inputs = _make_block(kind)
    ref = _reference(kind, blk)
    if dtype == np.float16:
        blk.cast("float16")
    if n_inputs == 1:
        blk.collect_params().setattr("grad_req", "add")
    if hybridize:
        blk.hybridize()
    # Head gradients are zeroed near the output relu's kink; an inner relu's pre-activation
    # must be clear of it by more than the float16 rounding of z (a few 1e-3) can move it.
    margin, inner_margin = (5e-2, 1e-2) if dtype == np.float16 else (1e-3, 1e-4)
    rng = np.random.default_rng(8)
    xs = [rng.standard_normal((2, 4 if n_inputs == 1 else 6, 17)).astype(dtype)
          for _ in range(n_inputs)]
    x64 = [x.astype(np.float64) for x in xs]
    dxs_ref = None
    for _ in range(2):  # the second step: same output, gradients and statistics once more
        y_ref = ref.forward(*x64) if n_inputs == 2 else ref.forward(x64[0], True)
        if dxs_ref is None:
            for pre in getattr(ref, "inner_pre", list)():
                assert np.abs(pre).min() > inner_margin
            dy = away_from_kink(rng.standard_normal(y_ref.shape), ref.pre(), margin)
        dxs = ref.backward(dy)
        dxs = dxs if isinstance(dxs, tuple) else (dxs,)
        dxs_ref = dxs if dxs_ref is None else tuple(t + d for t, d in zip(dxs_ref, dxs))

    args = [mx.nd.array(x, dtype=dtype) for x in xs]
    for a in args:
        a.attach_grad("add")
    for _ in range(2):
        with autograd.record():
            y = blk(*args)
        y.backward(mx.nd.array(dy, dtype=dtype))
    assert y.dtype == dtype
    assert_close(y.asnumpy(), y_ref, dtype, "output")
    for i, (a, g) in enumerate(zip(args, dxs_ref)):
        assert a.grad.dtype == dtype
        assert_close(a.grad.asnumpy(), g, dtype, f"input {i} gradient, accumulated")
    ref.check(dtype)
    if n_inputs == 1:
        y_inf = ref.forward(x64[0], False)
        assert_close(blk(*args).asnumpy(), y_inf, dtype, "inference output")
