"""CUDA kernels (fusedres.cuda on CuPy arrays) against the numpy reference.

Needs no MXNet. With a GPU, CuPy runs them; without one, the CPU emulation of CUDA in
tests/cuda_emu, in two schedules (conftest.py's cuda_target). References run in float64 on the
very values the kernel saw (float16 inputs are rounded first), so the tolerance only has to
cover the kernel's own error.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import cuda_targets

from fusedres import cuda, reference

cp = None  # CuPy or the emulation's stand-in, set per target by _target


@pytest.fixture(autouse=True, scope="module")
def _target(cuda_target):
    global cp
    cp = cuda_target[1]

# (atol, rtol) of max|got - ref| <= atol + rtol * max|ref|, by data dtype.
TOL = {np.float32: (1e-4, 1e-4), np.float16: (1e-2, 1e-2)}

# name: (N, Cin, Cout, L, K, stride, pad, dilation, groups, bias)
CASES = {
    "c7": (2, 7, 7, 97, 3, 1, 1, 1, 1, True),
    "c64": (2, 64, 64, 97, 3, 1, 1, 1, 1, True),
    "stride2": (3, 8, 6, 97, 5, 2, 2, 1, 1, True),
    "dilation2_nobias": (2, 8, 8, 97, 3, 1, 2, 2, 1, False),
    "groups2": (2, 8, 6, 97, 3, 1, 1, 1, 2, True),
    "all_nopad": (2, 64, 64, 97, 3, 2, 0, 2, 2, False),
    "tiles": (2, 72, 130, 97, 3, 1, 1, 1, 1, True),  # several row tiles and k slices
    "long": (2, 8, 8, 2500, 3, 1, 1, 1, 1, True),  # reductions and weight gradient split
}
# (data dtype, per-channel dtype)
DTYPES = {"f32": (np.float32, np.float32), "f16": (np.float16, np.float16),
          "f16_p32": (np.float16, np.float32)}
EPS, MOMENTUM = 1e-5, 0.9


def assert_close(got, ref, dtype, name):
    got = cp.asnumpy(got).astype(np.float64)
    ref = np.asarray(ref, np.float64)
    atol, rtol = TOL[dtype]
    err = np.abs(got - ref).max()
    bound = atol + rtol * np.abs(ref).max()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def make_inputs(case, dtypes, seed=0):
    n, cin, cout, width, k, stride, pad, dil, groups, has_bias = CASES[case]
    dt, pt = DTYPES[dtypes]
    rng = np.random.default_rng(seed)
    host = dict(
        x=rng.standard_normal((n, cin, width)).astype(dt),
        w=(rng.standard_normal((cout, cin // groups, k)) / np.sqrt(cin // groups * k)).astype(dt),
        bias=rng.standard_normal(cout).astype(dt) if has_bias else None,
        gamma=rng.uniform(0.5, 1.5, cout).astype(pt),
        beta=(0.5 * rng.standard_normal(cout)).astype(pt),
        rm=(0.2 * rng.standard_normal(cout)).astype(pt),
        rv=rng.uniform(0.5, 2.0, cout).astype(pt),
    )
    conv = dict(stride=stride, pad=pad, dilation=dil, groups=groups)
    return host, conv, dt, pt


def f64(a):
    return None if a is None else np.asarray(a, np.float64)


def dev(a):
    return None if a is None else cp.asarray(a)


def run_forward_train(host, conv, dt, pt, use_batch_stats, relu=True):
    lout = reference.conv1d_out_width(host["x"].shape[2], host["w"].shape[2], conv["stride"],
                                      conv["pad"], conv["dilation"])
    shape = (host["x"].shape[0], host["w"].shape[0], lout)
    d = {k: dev(v) for k, v in host.items()}
    cout = host["w"].shape[0]
    d.update(z=cp.empty(shape, dt), y=cp.empty(shape, dt), mean=cp.empty(cout, pt),
             invstd=cp.empty(cout, pt))
    cuda.conv1d_bn_relu_forward_train(
        d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"], d["rv"], d["z"], d["mean"],
        d["invstd"], d["y"], conv["stride"], conv["pad"], conv["dilation"], conv["groups"], EPS,
        MOMENTUM, use_batch_stats, True, relu=relu)
    return d


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_batch_stats", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_forward_train(case, dtypes, use_batch_stats, relu):
    host, conv, dt, pt = make_inputs(case, dtypes)
    d = run_forward_train(host, conv, dt, pt, use_batch_stats, relu)
    y, cache, rm, rv = reference.conv1d_bn_relu_forward(
        f64(host["x"]), f64(host["w"]), f64(host["bias"]), f64(host["gamma"]), f64(host["beta"]),
        f64(host["rm"]), f64(host["rv"]), eps=EPS, momentum=MOMENTUM, training=True,
        use_global_stats=not use_batch_stats, relu=relu, **conv)
    z = reference.conv1d(f64(host["x"]), f64(host["w"]), f64(host["bias"]), **conv)
    assert_close(d["z"], z, dt, "z")
    assert_close(d["y"], y, dt, "out")
    if use_batch_stats:
        assert_close(d["mean"], z.mean(axis=(0, 2)), dt, "mean")
        assert_close(d["invstd"], 1 / np.sqrt(z.var(axis=(0, 2)) + EPS), dt, "invstd")
    else:
        assert_close(d["mean"], f64(host["rm"]), dt, "mean")
        assert_close(d["invstd"], 1 / np.sqrt(f64(host["rv"]) + EPS), dt, "invstd")
    assert_close(d["rm"], rm, dt, "running_mean")
    assert_close(d["rv"], rv, dt, "running_var")


def test_forward_train_without_running_update_leaves_running_stats():
    host, conv, dt, pt = make_inputs("c7", "f32")
    d = {k: dev(v) for k, v in host.items()}
    shape = (2, 7, 97)
    z, y = cp.empty(shape, dt), cp.empty(shape, dt)
    mean, invstd = cp.empty(7, pt), cp.empty(7, pt)
    cuda.conv1d_bn_relu_forward_train(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"],
                                      d["rv"], z, mean, invstd, y, 1, 1, 1, 1, EPS, MOMENTUM,
                                      True, False)
    np.testing.assert_array_equal(cp.asnumpy(d["rm"]), host["rm"])
    np.testing.assert_array_equal(cp.asnumpy(d["rv"]), host["rv"])


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("relu", [True, False])
def test_forward_infer(case, dtypes, relu):
    host, conv, dt, pt = make_inputs(case, dtypes)
    y_ref = reference.conv1d_bn_relu_forward(
        f64(host["x"]), f64(host["w"]), f64(host["bias"]), f64(host["gamma"]), f64(host["beta"]),
        f64(host["rm"]), f64(host["rv"]), eps=EPS, training=False, relu=relu, **conv)[0]
    d = {k: dev(v) for k, v in host.items()}
    y = cp.empty(y_ref.shape, dt)
    cuda.conv1d_bn_relu_forward_infer(d["x"], d["w"], d["bias"], d["gamma"], d["beta"], d["rm"],
                                      d["rv"], y, conv["stride"], conv["pad"], conv["dilation"],
                                      conv["groups"], EPS, relu=relu)
    assert_close(y, y_ref, dt, "out")


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_backward(case, dtypes, batch_stats, relu):
    host, conv, dt, pt = make_inputs(case, dtypes)
    d = run_forward_train(host, conv, dt, pt, batch_stats, relu)
    rng = np.random.default_rng(1)
    dy = rng.standard_normal(d["z"].shape).astype(dt)
    _, cache, _, _ = reference.conv1d_bn_relu_forward(
        f64(host["x"]), f64(host["w"]), f64(host["bias"]), f64(host["gamma"]), f64(host["beta"]),
        f64(host["rm"]), f64(host["rv"]), eps=EPS, momentum=MOMENTUM, training=True,
        use_global_stats=not batch_stats, relu=relu, **conv)
    # The relu mask is the one the kernel recomputes from what forward saved; deriving it from
    # the float64 forward instead would flip elements sitting at the kink in float16.
    z, mean, invstd = (f64(cp.asnumpy(d[k])) for k in ("z", "mean", "invstd"))
    cache["xhat"] = (z - mean[None, :, None]) * invstd[None, :, None]
    cache["invstd"] = invstd
    cache["pre"] = (f64(host["gamma"])[None, :, None] * cache["xhat"]
                    + f64(host["beta"])[None, :, None])
    ref = reference.conv1d_bn_relu_backward(f64(dy), cache)

    cout = host["w"].shape[0]
    grads = dict(data=cp.empty(host["x"].shape, dt), weight=cp.empty(host["w"].shape, dt),
                 bias=cp.empty(cout, dt) if host["bias"] is not None else None,
                 gamma=cp.empty(cout, pt), beta=cp.empty(cout, pt))
    cuda.conv1d_bn_relu_backward(
        cp.asarray(dy), d["x"], d["w"], d["z"], d["gamma"], d["beta"], d["mean"], d["invstd"],
        grads["data"], grads["weight"], grads["bias"], grads["gamma"], grads["beta"],
        conv["stride"], conv["pad"], conv["dilation"], conv["groups"], batch_stats, relu=relu)
    for name, got in grads.items():
        if got is not None:
            assert_close(got, ref[name], dt, f"{name}_grad")


@pytest.mark.parametrize("wanted", [("data",), ("weight",), ("gamma", "beta"), ("bias",)])
def test_backward_partial_gradients(wanted):
    host, conv, dt, pt = make_inputs("groups2", "f32")
    d = run_forward_train(host, conv, dt, pt, True)
    dy = cp.asarray(np.random.default_rng(2).standard_normal(d["z"].shape).astype(dt))
    shapes = dict(data=host["x"].shape, weight=host["w"].shape, bias=(6,), gamma=(6,), beta=(6,))
    full = {k: cp.empty(v, dt) for k, v in shapes.items()}
    part = {k: (cp.empty(v, dt) if k in wanted else None) for k, v in shapes.items()}
    for g in (full, part):
        cuda.conv1d_bn_relu_backward(dy, d["x"], d["w"], d["z"], d["gamma"], d["beta"],
                                     d["mean"], d["invstd"], g["data"], g["weight"], g["bias"],
                                     g["gamma"], g["beta"], 1, 1, 1, 2, True)
    for k in wanted:
        np.testing.assert_array_equal(cp.asnumpy(part[k]), cp.asnumpy(full[k]))


def test_deterministic():
    host, conv, dt, pt = make_inputs("c64", "f32")
    outs = []
    for _ in range(2):
        d = run_forward_train(host, conv, dt, pt, True)
        dy = cp.asarray(np.random.default_rng(3).standard_normal(d["z"].shape).astype(dt))
        g = dict(data=cp.empty(host["x"].shape, dt), weight=cp.empty(host["w"].shape, dt),
                 bias=cp.empty(64, dt), gamma=cp.empty(64, pt), beta=cp.empty(64, pt))
        cuda.conv1d_bn_relu_backward(dy, d["x"], d["w"], d["z"], d["gamma"], d["beta"],
                                     d["mean"], d["invstd"], g["data"], g["weight"], g["bias"],
                                     g["gamma"], g["beta"], 1, 1, 1, 1, True)
        outs.append([cp.asnumpy(a) for a in (d["y"], d["mean"], d["invstd"], *g.values())])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(2, 7, 97), (3, 64, 1025), (5,)])
@pytest.mark.parametrize("offset", [0, 1])  # 1: not 16-byte aligned, the scalar path
def test_add_relu(shape, dtype, offset):
    rng = np.random.default_rng(4)
    size = int(np.prod(shape))

    def buf(host):  # a contiguous view starting `offset` elements into its allocation
        d = cp.empty(size + offset, dtype)
        d[offset:] = cp.asarray(host.ravel())
        return d[offset:].reshape(shape)

    a, b, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    y = buf(np.zeros(shape, dtype))
    cuda.add_relu_forward(buf(a), buf(b), y)
    y_ref = reference.add_relu_forward(f64(a), f64(b))
    assert_close(y, y_ref, dtype, "out")
    ga_ref, _ = reference.add_relu_backward(f64(dy), f64(cp.asnumpy(y)))
    da, db = buf(np.zeros(shape, dtype)), buf(np.zeros(shape, dtype))
    cuda.add_relu_backward(buf(dy), y, da, db)
    np.testing.assert_array_equal(cp.asnumpy(da), ga_ref.astype(dtype))
    np.testing.assert_array_equal(cp.asnumpy(db), ga_ref.astype(dtype))
    only = buf(np.zeros(shape, dtype))
    cuda.add_relu_backward(buf(dy), y, None, only)
    np.testing.assert_array_equal(cp.asnumpy(only), ga_ref.astype(dtype))


def test_checks_name_the_argument():
    x = cp.zeros((2, 4, 10), np.float32)
    w = cp.zeros((4, 4, 3), np.float32)
    c = cp.zeros(4, np.float32)
    out = cp.zeros((2, 4, 10), np.float32)
    with pytest.raises(TypeError, match="weight must have the same dtype as data"):
        cuda.conv1d_bn_relu_forward_infer(x, w.astype(np.float16), None, c, c, c, c, out,
                                          1, 1, 1, 1, EPS)
    with pytest.raises(TypeError, match="data must be float32 or float16"):
        cuda.conv1d_bn_relu_forward_infer(x.astype(np.float64), w, None, c, c, c, c, out,
                                          1, 1, 1, 1, EPS)
    with pytest.raises(ValueError, match="data must be C-contiguous"):
        cuda.conv1d_bn_relu_forward_infer(x[:, :, ::2], w, None, c, c, c, c, out, 1, 1, 1, 1, EPS)
    with pytest.raises(ValueError, match="output must have shape"):
        cuda.conv1d_bn_relu_forward_infer(x, w, None, c, c, c, c, out[:, :, :9].copy(),
                                          1, 1, 1, 1, EPS)
    with pytest.raises(ValueError, match="groups"):
        cuda.conv1d_bn_relu_forward_infer(x, w, None, c, c, c, c, out, 1, 1, 1, 3, EPS)
    with pytest.raises(TypeError, match="lhs must be a cupy.ndarray"):
        cuda.add_relu_forward(np.zeros(3, np.float32), cp.zeros(3, np.float32),
                              cp.zeros(3, np.float32))
    with pytest.raises(ValueError, match="lhs and rhs must have the same shape"):
        cuda.add_relu_forward(cp.zeros(3, np.float32), cp.zeros(4, np.float32),
                              cp.zeros(3, np.float32))


def test_launch_takes_numpy_scalars_and_refuses_python_numbers():
    """np.float64 is a subclass of float: the launch check once refused it, and with it every
    training forward (bn_fwd_finalize takes eps and momentum as doubles). Plain Python numbers
    are refused: CuPy would pass them as 8 bytes whatever the parameter's type."""
    c, m = 3, 100  # two column tiles of 64 and 36 values
    psum = np.array([[6.4, -3.2, 64.0], [7.2, 3.6, 0.0]], np.float32)
    pm2 = np.array([[12.8, 6.4, 0.0], [3.6, 7.2, 36.0]], np.float32)
    rm, rv = np.array([0.5, -0.5, 0.0], np.float32), np.array([1.0, 2.0, 0.5], np.float32)
    d = dict(psum=cp.asarray(psum), pm2=cp.asarray(pm2), rm=cp.asarray(rm), rv=cp.asarray(rv),
             mean=cp.empty(c, np.float32), invstd=cp.empty(c, np.float32))

    def args(eps=np.float64(EPS), ntiles=np.int32(2), update=np.int32(1)):
        return (d["psum"], d["pm2"], ntiles, np.int32(m), np.int32(c), d["rm"], d["rv"],
                d["mean"], d["invstd"], eps, np.float64(MOMENTUM), np.int32(1), update)

    cuda._launch("conv1d_bn_relu", "bn_fwd_finalize_f32", (c,), (256,), args())
    counts = np.array([64.0, 36.0])[:, None]
    mu = psum.astype(np.float64).sum(0) / m
    var = (pm2 + counts * (psum / counts - mu) ** 2).sum(0) / m
    assert_close(d["mean"], mu, np.float32, "mean")
    assert_close(d["invstd"], 1 / np.sqrt(var + EPS), np.float32, "invstd")
    assert_close(d["rm"], MOMENTUM * rm + (1 - MOMENTUM) * mu, np.float32, "running_mean")
    assert_close(d["rv"], MOMENTUM * rv + (1 - MOMENTUM) * var, np.float32, "running_var")
    for bad, match in [(dict(eps=EPS), "argument 9 is a Python float"),
                       (dict(ntiles=2), "argument 2 is a Python int"),
                       (dict(update=True), "argument 12 is a Python bool")]:
        with pytest.raises(TypeError, match=match):
            cuda._launch("conv1d_bn_relu", "bn_fwd_finalize_f32", (c,), (256,), args(**bad))


# Mutants of the kernel sources that the checks must catch: name: (file, original, mutant).
MUTATIONS = {
    "gemm_tile without the barrier after the loads": (
        "conv1d_bn_relu.cu", "    __syncthreads();\n#pragma unroll\n    for (int kk",
        "#pragma unroll\n    for (int kk"),
    "gemm_tile without the barrier before the next loads": (
        "conv1d_bn_relu.cu", "    __syncthreads();\n  }\n}", "  }\n}"),
    "block_sum without the barrier before reusing warp_part": (
        "common.cuh", "  __syncthreads();  // warp_part may still be read by a previous call\n",
        ""),
    "block_sum without the barrier between writes and reads": (
        "common.cuh", "warp_part[warp] = v;\n  __syncthreads();\n", "warp_part[warp] = v;\n"),
    "block_sum shuffles with width 16": (
        "common.cuh", "v += __shfl_xor_sync(0xffffffffu, v, o);",
        "v += __shfl_xor_sync(0xffffffffu, v, o, 16);"),
    "half_warp_sum shuffles across both half warps": (
        "conv1d_bn_relu.cu", "for (int o = 8; o > 0;", "for (int o = 16; o > 0;"),
}


@pytest.fixture(scope="module")
def mutant_source(tmp_path_factory):
    """mutant_source(name): a copy of the CUDA sources with that mutation. All are made at once
    and, on the emulation, their conv kernels (the checks' kernels) built in parallel with the
    options fusedres.cuda compiles with: the emulation caches builds on disk by preprocessed
    source and options, so the checks' launches find them built."""
    made = {}
    for mutation, (name, old, new) in MUTATIONS.items():
        src = made[mutation] = tmp_path_factory.mktemp("cuda_src")
        for f in cuda.SOURCE_DIR.iterdir():
            if f.suffix in (".cu", ".cuh"):
                (src / f.name).write_text(f.read_text())
        text = (src / name).read_text()
        assert text.count(old) == 1, f"{mutation}: the original text is not once in {name}"
        (src / name).write_text(text.replace(old, new))
    if "gpu" not in cuda_targets():
        from cuda_emu import build

        jobs = []
        with pytest.MonkeyPatch.context() as mp:
            for src in made.values():
                mp.setattr(cuda, "SOURCE_DIR", src)
                opts = cuda.NVRTC_OPTIONS + tuple(f"-I{d}" for d in cuda._nvrtc_include_dirs())
                jobs.append(((src / "conv1d_bn_relu.cu").read_text(), opts))
        with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
            list(pool.map(lambda job: build.build(*job), jobs))
    return made.__getitem__


def _run_mutant(mutation, cuda_target, mutant_source, monkeypatch, checks):
    """The failures of checks ((what, fn) pairs) with the mutant compiled in place of csrc/cuda.
    On the emulation only: its schedules are deterministic, a GPU's are not."""
    if cuda_target[0] == "gpu":
        pytest.skip("mutants run on the CPU emulation of CUDA only")
    monkeypatch.setattr(cuda, "SOURCE_DIR", mutant_source(mutation))
    monkeypatch.setattr(cuda, "_modules", {})
    failed = []
    for what, check in checks:
        try:
            check()
        except Exception as e:  # a wrong result, or a check of the emulation (a deadlock)
            failed.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    print(f"{mutation} [{cuda_target[0]}]: {len(failed)} of {len(checks)} checks failed",
          *failed, sep="\n")
    return failed


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_mutant_fails_the_checks(mutation, cuda_target, mutant_source, monkeypatch):
    """A mutated copy of csrc/cuda (a barrier removed, a shuffle width broken) fails the float32
    forward (training, inference) and backward checks, in each schedule."""
    checks = []
    for case in CASES:
        checks += [(f"forward_train {case}", lambda c=case: test_forward_train(c, "f32", True, True)),
                   (f"forward_infer {case}", lambda c=case: test_forward_infer(c, "f32", True)),
                   (f"backward {case}", lambda c=case: test_backward(c, "f32", True, True))]
    failed = _run_mutant(mutation, cuda_target, mutant_source, monkeypatch, checks)
    assert failed, f"{mutation}: all {len(checks)} checks passed on the mutant"


# Races that one order of warps hides and the other shows, on the backward of case c64 (the
# plain order runs writers in low warps before readers in high ones, the reverse order the
# opposite): why the emulated suite runs in both.
SCHEDULE_DEPENDENT = {"block_sum without the barrier before reusing warp_part": "emu-reverse",
                      "block_sum without the barrier between writes and reads": "emu-plain"}


@pytest.mark.parametrize("mutation", SCHEDULE_DEPENDENT)
def test_one_schedule_shows_what_the_other_hides(mutation, cuda_target, mutant_source,
                                                  monkeypatch):
    checks = [("backward c64", lambda: test_backward("c64", "f32", True, True))]
    failed = _run_mutant(mutation, cuda_target, mutant_source, monkeypatch, checks)
    assert bool(failed) == (cuda_target[0] == SCHEDULE_DEPENDENT[mutation]), failed
