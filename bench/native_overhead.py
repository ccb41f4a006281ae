"""Per-call cost of the MXNet operators against the CustomOps and stock MXNet.

    .venv/bin/python bench/native_overhead.py [--rounds 15] [--calls 20] [--shapes tiny,ref]

For each shape, times one forward (inference mode) and one forward+backward (training mode,
autograd) per call, for:
  native   the MXNet operators (_fusedres_conv1d_bn_relu / _fusedres_add_relu, use_native=True)
  custom   the Python CustomOps (use_native=False)
  stock    MXNet: Convolution + BatchNorm + relu; training runs the conv as a (1, k) 2-D conv
           on (N, C, 1, W) (the 1-D route crashes in backward with MKLDNN, docs/mxnet-facts.md),
           inference uses the 1-D Convolution; add+relu is relu(a + b).
Each round runs every variant `calls` times back to back (waiting for the result at the end)
and the variants are interleaved round by round; the median over rounds of the per-call time
is reported, in ms.
"""
import argparse
import statistics
import time

import mxnet as mx
import numpy as np
from mxnet import autograd

import fusedres
from fusedres.ops import native

SHAPES = {"tiny": (2, 8, 16), "ref": (32, 64, 1024)}
K, PAD = 3, 1


def _conv_inputs(shape):
    n, c, w = shape
    rng = np.random.default_rng(0)
    arr = lambda a: mx.nd.array(a.astype(np.float32))  # noqa: E731
    d = dict(data=arr(rng.standard_normal(shape)),
             weight=arr(rng.standard_normal((c, c, K)) / np.sqrt(c * K)),
             bias=arr(np.zeros(c)), gamma=arr(np.ones(c)), beta=arr(np.zeros(c)),
             running_mean=arr(np.zeros(c)), running_var=arr(np.ones(c)))
    for k in ("data", "weight", "bias", "gamma", "beta"):
        d[k].attach_grad()
    return d


def _fused(use_native):
    def f(d):
        return fusedres.conv1d_bn_relu(d["data"], d["weight"], d["bias"], d["gamma"],
                                       d["beta"], d["running_mean"], d["running_var"], kernel=K,
                                       num_filter=d["weight"].shape[0], pad=PAD,
                                       use_native=use_native)
    return f


def _stock_train(d):
    n, c, w = d["data"].shape
    x4 = d["data"].reshape((n, c, 1, w))
    w4 = d["weight"].reshape((c, c, 1, K))
    z = mx.nd.Convolution(x4, w4, d["bias"], kernel=(1, K), pad=(0, PAD), num_filter=c)
    z = mx.nd.BatchNorm(z, d["gamma"], d["beta"], d["running_mean"], d["running_var"],
                        fix_gamma=False, eps=1e-5, momentum=0.9)
    return mx.nd.relu(z).reshape((n, c, -1))


def _stock_infer(d):
    c = d["weight"].shape[0]
    z = mx.nd.Convolution(d["data"], d["weight"], d["bias"], kernel=(K,), pad=(PAD,),
                          num_filter=c)
    z = mx.nd.BatchNorm(z, d["gamma"], d["beta"], d["running_mean"], d["running_var"],
                        fix_gamma=False, eps=1e-5, momentum=0.9)
    return mx.nd.relu(z)


def _add_inputs(shape):
    rng = np.random.default_rng(1)
    a = mx.nd.array(rng.standard_normal(shape).astype(np.float32))
    b = mx.nd.array(rng.standard_normal(shape).astype(np.float32))
    a.attach_grad()
    b.attach_grad()
    return dict(a=a, b=b)


def _variants(shape):
    conv, add = _conv_inputs(shape), _add_inputs(shape)
    head = mx.nd.ones((shape[0], shape[1], shape[2]))
    out = {}
    for name, fwd_train, fwd_infer in [
            ("native", _fused(True), _fused(True)),
            ("custom", _fused(False), _fused(False)),
            ("stock", _stock_train, _stock_infer)]:
        out[("conv_bn_relu", "fwd", name)] = (lambda f=fwd_infer: f(conv))
        out[("conv_bn_relu", "fwd+bwd", name)] = (lambda f=fwd_train: _train(f, conv, head))
    for name, f in [("native", lambda d: fusedres.add_relu(d["a"], d["b"], use_native=True)),
                    ("custom", lambda d: fusedres.add_relu(d["a"], d["b"], use_native=False)),
                    ("stock", lambda d: mx.nd.relu(d["a"] + d["b"]))]:
        out[("add_relu", "fwd", name)] = (lambda f=f: f(add))
        out[("add_relu", "fwd+bwd", name)] = (lambda f=f: _train(f, add, head))
    return out


def _train(f, d, head):
    with autograd.record():
        y = f(d)
    y.backward(head)
    return y


def _time(fn, calls):
    mx.nd.waitall()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    mx.nd.waitall()
    return (time.perf_counter() - t0) / calls * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--shapes", default="tiny,ref")
    args = ap.parse_args()
    ok, why = native.available()
    if not ok:
        raise SystemExit(f"the MXNet operators are unavailable: {why}")
    print(f"MXNet {mx.__version__}, rounds={args.rounds}, median per-call ms")
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        variants = _variants(shape)
        calls = args.calls if key == "tiny" else max(2, args.calls // 10)
        for fn in variants.values():  # warm-up (and MKLDNN primitive creation)
            _time(fn, 2)
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, fn in variants.items():
                times[k].append(_time(fn, calls))
        print(f"\nshape {shape}, kernel {K}, pad {PAD}, {calls} calls per round")
        print(f"{'op':14s} {'pass':8s} {'native':>9s} {'custom':>9s} {'stock':>9s} "
              f"{'custom/native':>14s} {'stock/native':>13s}")
        for op in ("conv_bn_relu", "add_relu"):
            for mode in ("fwd", "fwd+bwd"):
                m = {n: statistics.median(times[(op, mode, n)])
                     for n in ("native", "custom", "stock")}
                print(f"{op:14s} {mode:8s} {m['native']:9.3f} {m['custom']:9.3f} "
                      f"{m['stock']:9.3f} {m['custom'] / m['native']:14.1f} "
                      f"{m['stock'] / m['native']:13.2f}")


if __name__ == "__main__":
    main()
