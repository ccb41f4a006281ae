"""pytest-benchmark suite on the shared shape table (fusedres.benchmarks.SHAPES) and a whole
1-D ResNet (fusedres.benchmarks.MODEL): the fused blocks against every working form of stock
MXNet and PyTorch eager, all timed interleaved on the same input values; and how fast a fused
layer runs inside a network against alone. conftest.py writes the results file."""
import json
import os
import shutil
import tempfile
import time

import mxnet as mx
import numpy as np
import peers
import pytest
from benchenv import rounds
from mxnet import autograd

from fusedres import benchmarks
from fusedres.nn import AddReLU, ConvBNReLU1D


def _interleaved(benchmark, contenders, n_rounds):
    """pytest-benchmark times whole rounds; the per-contender medians (what the results file
    reports) come from the same rounds, as benchmarks.interleaved_times times them: the order
    changing from round to round (benchmarks.round_order), each contender settling (untimed)
    before its timed calls."""
    times = {k: [] for k in contenders}
    names = list(contenders)
    rnd = [0]

    def one_round():
        order = benchmarks.round_order(names, rnd[0])
        rnd[0] += 1
        for k in order:
            times[k] += benchmarks.timed_block(contenders[k])
    for _ in range(3):
        one_round()
    for v in times.values():
        v.clear()
    benchmark.pedantic(one_round, rounds=rounds(n_rounds), iterations=1)
    medians = {k: float(np.median(v)) for k, v in times.items()}
    benchmark.extra_info.update({f"{k} median ms": v * 1e3 for k, v in medians.items()})
    return medians


MODES = {"train": "training step", "infer": "inference"}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", benchmarks.SHAPES, ids=[s.name for s in benchmarks.SHAPES])
def test_conv1d_bn_relu(benchmark, results, shape, mode):
    benchmark.group = f"conv1d_bn_relu {shape.name} {mode}"
    x = mx.nd.random.normal(shape=(shape.n, shape.c, shape.width))
    dy = mx.nd.random.normal(shape=(shape.n, shape.out_channels, shape.out_width))
    contenders = benchmarks.conv_contenders(shape, mode, x=x, dy=dy)
    contenders.update(peers.conv_contenders(shape, mode, x.asnumpy(), dy.asnumpy()))
    flop = shape.conv_gflop * 1e9 * (3 if mode == "train" else 1)
    med = _interleaved(benchmark, contenders, int(np.clip(20.0 / flop * 1e9, 15, 50)))
    results.add(shape.label, MODES[mode], med, flop, "GFLOP/s")


@pytest.mark.parametrize("configuration", list(benchmarks.CONFIGURATIONS))
def test_tiny_training_step_configurations(benchmark, results, configuration):
    """The per-call cost where it dominates (the tiny shape), in the configurations that once
    sent the fused blocks to the CustomOps: static_alloc and grad_req='add'."""
    shape = benchmarks.shape_named("tiny")
    benchmark.group = f"conv1d_bn_relu tiny {configuration}"
    med = _interleaved(benchmark, benchmarks.configuration_contenders(shape, configuration),
                       30)
    results.add(shape.label, f"training step, {configuration}", med, shape.conv_gflop * 3e9,
                "GFLOP/s", section="configurations")


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_add_relu(benchmark, results, backward):
    benchmark.group = f"add_relu {'fwd+bwd' if backward else 'fwd'}"
    shape = (2, 1024, 1024)
    a_np, b_np = (np.random.standard_normal(shape).astype(np.float32) for _ in range(2))
    a, b = mx.nd.array(a_np), mx.nd.array(b_np)
    fused = AddReLU()
    fused.hybridize()
    if backward:
        a.attach_grad()
        b.attach_grad()

    def run(f):
        def go():
            if backward:
                with autograd.record():
                    y = f(a, b)
                y.backward()
                mx.nd.waitall()
            else:
                f(a, b).wait_to_read()
        return go
    contenders = {"fused": run(fused), "stock": run(lambda x, y: mx.nd.relu(x + y))}
    contenders.update(peers.add_relu_contenders(a_np, b_np, backward))
    med = _interleaved(benchmark, contenders, 30)
    n = a_np.size * 4
    traffic = 3 * n + (4 * n if backward else 0)  # read a, b, write y (+ read dy, y; write 2)
    results.add(f"add_relu {shape}", "forward+backward" if backward else "forward", med,
                traffic, "GB/s", section="add_relu")


# Whole model ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
def test_resnet1d(benchmark, results, mode):
    """fusedres.fuse() on the stock 1-D model against the stock model (kept 4-D; and in
    inference as written, in 1-D) and PyTorch's twin (bench/peers.py)."""
    m = benchmarks.MODEL
    benchmark.group = f"{m.name} {mode}"
    x = mx.nd.random.normal(shape=(m.n, m.c_in, m.width))
    dy = mx.nd.random.normal(shape=(m.n, m.classes))
    contenders = benchmarks.model_contenders(mode, m, x=x, dy=dy)
    contenders.update(peers.model_contenders(m, mode, x.asnumpy(), dy.asnumpy()))
    flop = (m.train_gflop if mode == "train" else m.conv_gflop) * 1e9
    med = _interleaved(benchmark, contenders, 15)
    results.add(m.label, MODES[mode], med, flop, "GFLOP/s", section="models")


def _model_layers(m):
    """[(BenchShape, how many of the model's convs it is)] of the model's distinct convs."""
    counts = {}
    for layer, width in m.conv_layers():
        s = benchmarks.BenchShape(
            f"{m.name} conv", m.n, layer.cin, width, layer.kernel, layer.stride, layer.pad,
            layer.dilation, layer.groups, cout=layer.cout)
        counts[s] = counts.get(s, 0) + 1
    return list(counts.items())


@pytest.mark.parametrize("mode", list(MODES))
def test_resnet1d_layers(benchmark, results, mode):
    """The model's distinct conv layers (+ BatchNorm + relu), each alone, as the shared table
    times them: where the model's time goes, layer by layer."""
    m = benchmarks.MODEL
    benchmark.group = f"{m.name} layers {mode}"
    rows = []

    def measure():
        for shape, count in _model_layers(m):
            x = mx.nd.random.normal(shape=(shape.n, shape.c, shape.width))
            dy = mx.nd.random.normal(shape=(shape.n, shape.out_channels, shape.out_width))
            contenders = benchmarks.conv_contenders(shape, mode, x=x, dy=dy)
            contenders.update(peers.conv_contenders(shape, mode, x.asnumpy(), dy.asnumpy()))
            flop = shape.conv_gflop * 1e9 * (3 if mode == "train" else 1)
            rows.append((shape, count, benchmarks.interleaved_medians(contenders, rounds(7)),
                         flop))
    benchmark.pedantic(measure, rounds=1, iterations=1)
    for shape, count, med, flop in rows:
        results.add(f"{shape.label} x{count}", MODES[mode], med, flop, "GFLOP/s",
                    section="model_layers")


# Inside a network -------------------------------------------------------------------------

def _alone_and_alternating(a, b):
    """Median seconds of a call of a and of b, each timed right after itself (alone) and right
    after the other (alternating), in rounds of a, [a], b, [a], [b], [b]."""
    samples = {"a alone": [], "a after b": [], "b after a": [], "b alone": []}

    def timed(fn, key):
        t0 = time.perf_counter()
        fn()
        samples[key].append(time.perf_counter() - t0)

    def one_round():
        a()
        timed(a, "a alone")
        b()
        timed(a, "a after b")
        timed(b, "b after a")
        timed(b, "b alone")
    for _ in range(2):
        one_round()
    for v in samples.values():
        v.clear()
    return one_round, samples


@pytest.mark.parametrize("mode", list(MODES))
def test_fused_layer_alone_and_alternating(benchmark, results, mode):
    """The reference layer timed alone and when its calls alternate with a stock layer's
    (Conv1D+BatchNorm+relu in inference, the 4-D workaround in training), as in a model."""
    shape = benchmarks.shape_named("reference")
    benchmark.group = f"reference {mode} alone/alternating"
    partner = "stock Conv1D" if mode == "infer" else "stock 4-D"
    contenders = benchmarks.conv_contenders(shape, mode)
    one_round, s = _alone_and_alternating(contenders["fused"], contenders[partner])
    benchmark.pedantic(one_round, rounds=rounds(20), iterations=1)
    med = {k: float(np.median(v)) * 1e3 for k, v in s.items()}
    benchmark.extra_info.update(med)
    results.add_inside(
        "A fused layer alone and alternating with a stock layer",
        "Rounds of `fused, [fused], stock, [fused], [stock], [stock]` (bracketed calls timed): "
        "alone = right after its own call, alternating = right after the other's; medians in "
        "ms; ratio = alternating / alone.",
        ["shape", "mode", "stock layer", "fused alone", "fused alternating", "ratio",
         "stock alone", "stock alternating", "ratio"],
        [shape.label, MODES[mode], partner, f"{med['a alone']:.3f}", f"{med['a after b']:.3f}",
         f"{med['a after b'] / med['a alone']:.2f}", f"{med['b alone']:.3f}",
         f"{med['b after a']:.3f}", f"{med['b after a'] / med['b alone']:.2f}"])


@pytest.fixture(scope="module")
def profile_dir():
    """One directory for the profiler's file (MXNet may still be writing it when a call's own
    temporary directory would be removed: "Directory not empty")."""
    tmp = tempfile.mkdtemp(prefix="fusedres-profile-")
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _profiled_op_ms(run, reps, tmp, match="fusedres_conv1d_bn_relu"):
    """MXNet's profiler: ms per run() of the operators whose name contains match (forward and
    backward), and {operator: ms per run()} of all of them. tmp: a directory for its file."""
    run()
    mx.nd.waitall()
    mx.profiler.set_config(profile_symbolic=True, profile_imperative=True,
                           profile_memory=False, profile_api=False, aggregate_stats=True,
                           filename=os.path.join(tmp, "profile.json"))
    mx.profiler.set_state("run")
    for _ in range(reps):
        run()
    mx.nd.waitall()
    mx.profiler.set_state("stop")
    ops = json.loads(mx.profiler.dumps(reset=True, format="json"))["Time"]["operator"]
    per_op = {k: v["Total"] / reps for k, v in ops.items()}
    return sum(v for k, v in per_op.items() if match in k), per_op


def _layer_inputs(net, x):
    """[(fused block, its input)] of every fused layer in net, in forward order, from one
    imperative forward."""
    blocks, seen = [], {}

    def walk(b):
        if isinstance(b, ConvBNReLU1D):
            blocks.append(b)
        for c in b._children.values():
            walk(c)
    walk(net)
    hooks = [b.register_forward_hook(
        lambda blk, inputs, out: seen.setdefault(id(blk), inputs[0].copy())) for b in blocks]
    net.hybridize(active=False)
    with autograd.predict_mode():
        net(x).wait_to_read()
    for h in hooks:
        h.detach()
    net.hybridize()
    return [(b, seen[id(b)]) for b in blocks]


@pytest.mark.parametrize("mode", list(MODES))
def test_fused_layers_inside_the_model(benchmark, results, mode, profile_dir):
    """The fused operators' time inside the model (MXNet's profiler, per step) against the same
    layers, on the same inputs, each run alone back to back."""
    m = benchmarks.MODEL
    benchmark.group = f"{m.name} {mode} fused layers inside/alone"
    x = mx.nd.random.normal(shape=(m.n, m.c_in, m.width))
    net = benchmarks.fused_resnet1d(m)
    layers = _layer_inputs(net, x)
    nrounds, per_round = rounds(10), 2
    if mode == "train":
        dy = mx.nd.random.normal(shape=(m.n, m.classes))
        model_run = benchmarks.training_step(net, x, dy)
        alone = []
        for i, (b, xi) in enumerate(layers):
            if i:  # inside the model, every layer's input but the stem's needs a gradient
                xi.attach_grad()
            dyi = mx.nd.random.normal(shape=b(xi).shape)
            alone.append(benchmarks.training_step(b, xi, dyi))
    else:
        model_run = benchmarks.inference(net, x)
        alone = [benchmarks.inference(b, xi) for b, xi in layers]
    out = {}

    def measure():
        # Interleaved: each round profiles the model's steps, then every layer alone, so that
        # the machine's load lands on both sides alike; medians over the rounds.
        inside, alone_ms, model_ops = [], [], {}
        for _ in range(nrounds):
            ms, ops = _profiled_op_ms(model_run, per_round, profile_dir)
            inside.append(ms)
            for k, v in ops.items():
                model_ops.setdefault(k, []).append(v)
            alone_ms.append(sum(_profiled_op_ms(run, per_round, profile_dir)[0] for run in alone))
        out["inside"], out["alone"] = float(np.median(inside)), float(np.median(alone_ms))
        out["model ops"] = {k: float(np.median(v)) for k, v in model_ops.items()}
    benchmark.pedantic(measure, rounds=1, iterations=1)
    ops = out.pop("model ops")
    others = sorted(((v, k) for k, v in ops.items() if "fusedres_conv1d_bn_relu" not in k),
                    reverse=True)
    out["all operators"] = sum(ops.values())
    benchmark.extra_info.update(out)
    results.add_inside(
        "The fused layers inside the model and alone",
        "MXNet's profiler (aggregate operator time of fusedres's forward and backward "
        "operators, ms per step): inside = in the fused model's step; alone = each of the same "
        "fused layers run back to back on the input it gets inside the model, summed; "
        f"interleaved: {nrounds} rounds of {per_round} model steps, then {per_round} calls of "
        "each layer alone; medians over the rounds; ratio = inside / alone (1.10 is the 10% "
        "bound). All operators: every "
        "operator's time in the fused model's step; the others: the stock operators fuse() "
        "leaves (pooling, the residual add and relu, Dense), the largest first.",
        ["model", "mode", "fused layers", "inside ms", "alone ms", "ratio",
         "all operators ms", "other operators ms"],
        [m.label, MODES[mode], str(len(layers)), f"{out['inside']:.2f}", f"{out['alone']:.2f}",
         f"{out['inside'] / out['alone']:.2f}", f"{out['all operators']:.2f}",
         ", ".join(f"{k} {v:.2f}" for v, k in others[:4] if v >= 0.01)])
