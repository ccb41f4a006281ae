"""pytest-benchmark suite on the shared shape table (fusedres.benchmarks.SHAPES): the fused
block against stock MXNet and PyTorch eager, all timed interleaved on the same inputs."""
import time

import mxnet as mx
import numpy as np
import peers
import pytest
from mxnet import autograd

from fusedres import benchmarks
from fusedres.nn import AddReLU


def _interleaved(benchmark, contenders, rounds):
    """pytest-benchmark times whole rounds; each round runs every contender once, and the
    per-contender medians (what the results file reports) come from the same rounds. The
    order rotates from round to round: a library whose threads keep spinning after its call
    (PyTorch's do) slows whoever runs next, and rotation spreads that over all contenders."""
    times = {k: [] for k in contenders}
    names = list(contenders)
    rnd = [0]

    def one_round():
        r = rnd[0] % len(names)
        rnd[0] += 1
        for k in names[r:] + names[:r]:
            t0 = time.perf_counter()
            contenders[k]()
            times[k].append(time.perf_counter() - t0)
    for _ in range(3):
        one_round()
    for v in times.values():
        v.clear()
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    medians = {k: float(np.median(v)) for k, v in times.items()}
    benchmark.extra_info.update({f"{k} median ms": v * 1e3 for k, v in medians.items()})
    return medians


@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("shape", benchmarks.SHAPES, ids=[s.name for s in benchmarks.SHAPES])
def test_conv1d_bn_relu(benchmark, results, shape, mode):
    benchmark.group = f"conv1d_bn_relu {shape.name} {mode}"
    x = mx.nd.random.normal(shape=(shape.n, shape.c, shape.width))
    dy = mx.nd.random.normal(shape=(shape.n, shape.c, shape.out_width))
    contenders = benchmarks.conv_contenders(shape, mode, x=x, dy=dy)
    contenders.update(peers.conv_contenders(shape, mode, x.asnumpy(), dy.asnumpy()))
    flop = shape.conv_gflop * 1e9 * (3 if mode == "train" else 1)
    rounds = int(np.clip(20.0 / flop * 1e9, 15, 100))
    med = _interleaved(benchmark, contenders, rounds)
    results.add(f"{shape.name} {(shape.n, shape.c, shape.width)} k{shape.kernel}"
                f"{f' s{shape.stride}' if shape.stride > 1 else ''}"
                f"{f' d{shape.dilation}' if shape.dilation > 1 else ''}",
                "training step" if mode == "train" else "inference", med, flop, "GFLOP/s")


@pytest.mark.parametrize("configuration", list(benchmarks.CONFIGURATIONS))
def test_tiny_training_step_configurations(benchmark, results, configuration):
    """The per-call cost where it dominates (the tiny shape), in the configurations that once
    sent the fused blocks to the CustomOps: static_alloc and grad_req='add'."""
    shape = next(s for s in benchmarks.SHAPES if s.name == "tiny")
    benchmark.group = f"conv1d_bn_relu tiny {configuration}"
    med = _interleaved(benchmark, benchmarks.configuration_contenders(shape, configuration),
                       rounds=200)
    results.add(f"{shape.name} {(shape.n, shape.c, shape.width)} k{shape.kernel}",
                f"training step, {configuration}", med, shape.conv_gflop * 3e9, "GFLOP/s")


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
    med = _interleaved(benchmark, contenders, rounds=60)
    n = a_np.size * 4
    traffic = 3 * n + (4 * n if backward else 0)  # read a, b, write y (+ read dy, y; write 2)
    results.add(f"add_relu {shape}", "forward+backward" if backward else "forward", med,
                traffic, "GB/s")
