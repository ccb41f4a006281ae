"""Stock MXNet computations that tests/test_reference.py compares the numpy reference against.

Importable (``step(mx, case)`` for the in-process Conv2D route) and runnable as a script, so
that the MKLDNN-sensitive 1-D route can run in a fresh process with MXNET_MKLDNN_ENABLED=0:

    python tests/mxnet_stock.py batch  IN.npz OUT.npz   # every case in IN.npz, results to OUT.npz
    python tests/mxnet_stock.py crash                   # stock Conv1D->BatchNorm backward

A case is a dict of numpy arrays (x, w, [b], gamma, beta, rm, rv, dy, dz) plus parameters
(stride, pad, dilation, groups, eps, momentum, mode, layout). In a batch file the arrays of
case i are stored under ``"{i}/{name}"`` and all parameters under ``"params"`` (JSON).

mode: "train"  - autograd.record(train_mode=True), use_global_stats=False (batch statistics)
      "global" - autograd.record(train_mode=True), use_global_stats=True
      "infer"  - autograd.record(train_mode=False), use_global_stats=False
layout: "1d" - Convolution with kernel (k,) on (N, C, W), BatchNorm on 3-D data (the route that
               crashes under MKLDNN when C % 8 == 0)
        "2d" - the users' workaround: Convolution with kernel (1, k) on (N, C, 1, W)
"""
import json
import sys

import numpy as np

ARRAYS = ("x", "w", "b", "gamma", "beta", "rm", "rv", "dy", "dz")
PARAMS = ("stride", "pad", "dilation", "groups", "eps", "momentum", "mode", "layout")


def step(mx, case):
    """One forward+backward of relu(BatchNorm(Convolution(x))) with stock ops, plus the plain
    Convolution's forward and backward (head gradient ``dz``). Returns numpy arrays:
    y, data, weight, [bias], gamma, beta, rm, rv (running stats after the step),
    conv_z, conv_data, conv_weight, [conv_bias]."""
    from mxnet import autograd

    c = case
    dt = c["x"].dtype
    k = c["w"].shape[2]
    has_bias = c.get("b") is not None
    mode, layout = c.get("mode", "train"), c.get("layout", "1d")
    if layout == "1d":
        kw = dict(kernel=(k,), stride=(c["stride"],), pad=(c["pad"],),
                  dilate=(c["dilation"],))
        to_nd, from_nd = (lambda a: a), (lambda a: a)
    elif layout == "2d":
        kw = dict(kernel=(1, k), stride=(1, c["stride"]), pad=(0, c["pad"]),
                  dilate=(1, c["dilation"]))
        to_nd = lambda a: a[:, :, None, :]      # noqa: E731  (N,C,W) -> (N,C,1,W)
        from_nd = lambda a: a[:, :, 0, :]       # noqa: E731
    else:
        raise ValueError(layout)
    kw.update(num_filter=c["w"].shape[0], num_group=c["groups"], no_bias=not has_bias)

    def arr(a):
        return mx.nd.array(a, dtype=dt)

    x, w = arr(to_nd(c["x"])), arr(to_nd(c["w"]))
    gamma, beta = arr(c["gamma"]), arr(c["beta"])
    rm, rv = arr(c["rm"]), arr(c["rv"])
    params = [x, w, gamma, beta] + ([arr(c["b"])] if has_bias else [])
    for p in params:
        p.attach_grad()
    with autograd.record(train_mode=(mode != "infer")):
        z = mx.nd.Convolution(x, w, *params[4:], **kw)
        pre = mx.nd.BatchNorm(z, gamma, beta, rm, rv, eps=c["eps"], momentum=c["momentum"],
                              fix_gamma=False, use_global_stats=(mode == "global"), axis=1)
        y = mx.nd.relu(pre)
    # backward's train_mode defaults to True whatever record() said; "infer" must pass False
    # or MXNet's BatchNorm backward takes the batch-statistics branch (see test_reference.py).
    y.backward(arr(to_nd(c["dy"])), train_mode=(mode != "infer"))
    out = dict(y=from_nd(y.asnumpy()), data=from_nd(x.grad.asnumpy()),
               weight=from_nd(w.grad.asnumpy()), gamma=gamma.grad.asnumpy(),
               beta=beta.grad.asnumpy(), rm=rm.asnumpy(), rv=rv.asnumpy())
    if has_bias:
        out["bias"] = params[4].grad.asnumpy()

    for p in params:
        p.grad[:] = 0
    with autograd.record():
        z = mx.nd.Convolution(x, w, *params[4:], **kw)
    z.backward(arr(to_nd(c["dz"])))
    out.update(conv_z=from_nd(z.asnumpy()), conv_data=from_nd(x.grad.asnumpy()),
               conv_weight=from_nd(w.grad.asnumpy()))
    if has_bias:
        out["conv_bias"] = params[4].grad.asnumpy()
    return out


def save_cases(path, cases):
    arrays, params = {}, []
    for i, c in enumerate(cases):
        params.append({k: c[k] for k in PARAMS if k in c})
        for name in ARRAYS:
            if c.get(name) is not None:
                arrays[f"{i}/{name}"] = c[name]
    np.savez(path, params=np.array(json.dumps(params)), **arrays)


def load_cases(path):
    with np.load(path) as f:
        params = json.loads(str(f["params"]))
        cases = []
        for i, p in enumerate(params):
            c = dict(p)
            for name in ARRAYS:
                key = f"{i}/{name}"
                c[name] = f[key] if key in f.files else None
            cases.append(c)
    return cases


def save_results(path, results):
    np.savez(path, **{f"{i}/{k}": v for i, r in enumerate(results) for k, v in r.items()},
             count=np.array(len(results)))


def load_results(path):
    with np.load(path) as f:
        results = [dict() for _ in range(int(f["count"]))]
        for key in f.files:
            if key != "count":
                i, name = key.split("/", 1)
                results[int(i)][name] = f[key]
    return results


def crash_repro():
    """Stock Gluon Conv1D -> BatchNorm -> relu, forward+backward, first with 7 channels (a
    control that works), then with 64 (which fails under MKLDNN with "Check failed: !is_view")."""
    import mxnet as mx
    from mxnet import autograd, gluon
    from mxnet.runtime import Features

    print("MKLDNN compiled in:", Features().is_enabled("MKLDNN"), flush=True)
    for channels in (7, 64):
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Conv1D(channels, 3, padding=1, in_channels=channels),
                gluon.nn.BatchNorm(axis=1, in_channels=channels), gluon.nn.Activation("relu"))
        net.initialize()
        x = mx.nd.random.normal(shape=(2, channels, 16))
        with autograd.record():
            y = net(x)
        y.backward()
        mx.nd.waitall()
        print(f"channels={channels}: backward ok", flush=True)


def main(argv):
    if argv[0] == "crash":
        crash_repro()
    elif argv[0] == "batch":
        import mxnet as mx
        save_results(argv[2], [step(mx, c) for c in load_cases(argv[1])])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
