"""The shared benchmark table and the like-for-like contenders timed on it.

Used by ``python -m fusedres`` and by the benchmarks in bench/ (the pytest-benchmark suite and
the sweep), so all of them time the same shapes against the same stock paths.

Stock MXNet is timed in every form that works, and the ratios use the fastest one measured:

- ``stock 4-D``: Conv2D with kernel (1, k) + BatchNorm + relu on data kept ``(N, C, 1, W)``
  through the network (created 4-D, no reshape per layer): the strongest workaround for the
  MXNet 1.9.1 Conv1D+BatchNorm backward crash (docs/mxnet-facts.md), and a valid inference
  path too.
- ``stock expand_dims`` (training only): the per-layer ``expand_dims -> Conv2D(1, k) ->
  BatchNorm -> relu -> squeeze`` workaround on 3-D data.
- ``stock Conv1D`` (inference only): hybridized Conv1D + BatchNorm + relu, as a stock Gluon
  user writes it (its backward crashes, so it cannot train).
"""
import time
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn

from .nn import AddReLU, ConvBNReLU1D
from .reference import conv1d_out_width

STOCK_TRAIN = ("stock 4-D", "stock expand_dims")
STOCK_INFER = ("stock 4-D", "stock Conv1D")


@dataclass(frozen=True)
class ConvLayer:
    """One Conv1D -> BatchNorm -> relu layer."""
    cin: int
    cout: int
    kernel: int
    stride: int = 1
    pad: int = 0
    dilation: int = 1
    groups: int = 1

    def out_width(self, width):
        return conv1d_out_width(width, self.kernel, self.stride, self.pad, self.dilation)

    def gflop(self, n, width):
        """One forward convolution: every output takes (cin / groups) * kernel multiply-adds."""
        return (2.0 * n * self.cout * self.out_width(width) * (self.cin // self.groups)
                * self.kernel / 1e9)

    def conv_kwargs(self):
        return dict(strides=self.stride, padding=self.pad, dilation=self.dilation,
                    groups=self.groups)


@dataclass(frozen=True)
class BenchShape:
    """A row of the table: input (n, c, width) through one conv layer (c -> cout channels,
    cout defaults to c) or, with ``pointwise``, a conv layer keeping c channels followed by a
    1x1 conv layer to cout (depthwise-separable when groups == c)."""
    name: str
    n: int
    c: int
    width: int
    kernel: int
    stride: int = 1
    pad: int = 0
    dilation: int = 1
    groups: int = 1
    cout: int = 0
    pointwise: bool = False

    @property
    def out_channels(self):
        return self.cout or self.c

    @property
    def layers(self):
        first = ConvLayer(self.c, self.c if self.pointwise else self.out_channels, self.kernel,
                          self.stride, self.pad, self.dilation, self.groups)
        if not self.pointwise:
            return (first,)
        return first, ConvLayer(self.c, self.out_channels, 1)

    @property
    def out_width(self):
        width = self.width
        for layer in self.layers:
            width = layer.out_width(width)
        return width

    @property
    def conv_gflop(self):
        """The forward convolutions' work; a training step does three times this (forward,
        data gradient, weight gradient: the input needs a gradient, as inside a network)."""
        total, width = 0.0, self.width
        for layer in self.layers:
            total += layer.gflop(self.n, width)
            width = layer.out_width(width)
        return total

    def conv_kwargs(self):
        """The first layer's Conv1D keyword arguments."""
        return self.layers[0].conv_kwargs()

    @property
    def label(self):
        """e.g. ``depthwise (8, 256, 2048) k3 g256``."""
        s = f"{self.name} {(self.n, self.c, self.width)} k{self.kernel}"
        s += f" s{self.stride}" if self.stride > 1 else ""
        s += f" d{self.dilation}" if self.dilation > 1 else ""
        s += f" g{self.groups}" if self.groups > 1 else ""
        s += " + 1x1" if self.pointwise else ""
        return s + (f" ->{self.out_channels}" if self.out_channels != self.c else "")


SHAPES = [
    BenchShape("reference", 32, 64, 1024, 3, pad=1),
    BenchShape("wide-k5", 8, 256, 512, 5, pad=2),
    BenchShape("long-stride2", 64, 32, 4096, 3, stride=2, pad=1),
    BenchShape("pointwise-k1", 16, 128, 256, 1),
    BenchShape("audio-k9-dil2", 4, 64, 16000, 9, pad=4, dilation=2),
    BenchShape("depthwise", 8, 256, 2048, 3, pad=1, groups=256),
    BenchShape("separable", 8, 256, 2048, 3, pad=1, groups=256, pointwise=True),
    BenchShape("batch1", 1, 64, 1024, 3, pad=1),
    BenchShape("tiny", 2, 8, 16, 3, pad=1),
]


def shape_named(name):
    return next(s for s in SHAPES if s.name == name)


def _conv2d(layer):
    """layer as a Conv2D with kernel (1, k) on (N, C, 1, W)."""
    return nn.Conv2D(layer.cout, (1, layer.kernel), strides=(1, layer.stride),
                     padding=(0, layer.pad), dilation=(1, layer.dilation), groups=layer.groups,
                     in_channels=layer.cin)


class _StockExpandDims(gluon.HybridBlock):
    """One layer of the per-layer workaround: expand_dims -> Conv2D(1, k) -> BatchNorm -> relu
    -> squeeze, on 3-D data."""

    def __init__(self, layer, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.conv = _conv2d(layer)
            self.bn = nn.BatchNorm(in_channels=layer.cout)

    def hybrid_forward(self, F, x):
        y = F.relu(self.bn(self.conv(F.expand_dims(x, axis=2))))
        return F.squeeze(y, axis=2)


def _stock_layers(layers, kind):
    net = nn.HybridSequential()
    with net.name_scope():
        for layer in layers:
            if kind == "stock expand_dims":
                net.add(_StockExpandDims(layer))
                continue
            conv = (_conv2d(layer) if kind == "stock 4-D" else
                    nn.Conv1D(layer.cout, layer.kernel, in_channels=layer.cin,
                              **layer.conv_kwargs()))
            net.add(conv, nn.BatchNorm(in_channels=layer.cout), nn.Activation("relu"))
    return net


def stock_block(shape, kind="stock 4-D", **hybridize):
    """shape's layers in one of the stock forms (STOCK_TRAIN, STOCK_INFER); 'stock 4-D' takes
    (N, C, 1, W) inputs, the others (N, C, W)."""
    net = _stock_layers(shape.layers, kind)
    net.initialize(mx.init.Xavier())
    net.hybridize(**hybridize)
    return net


def fused_block(shape, use_native=None, **hybridize):
    blocks = [ConvBNReLU1D(layer.cout, layer.kernel, in_channels=layer.cin,
                           use_native=use_native, **layer.conv_kwargs())
              for layer in shape.layers]
    if len(blocks) == 1:
        net = blocks[0]
    else:
        net = nn.HybridSequential()
        net.add(*blocks)
    net.initialize(mx.init.Xavier())
    net.hybridize(**hybridize)
    return net


def training_step(net, x, dy):
    """One forward+backward through net, finished."""
    def run():
        with autograd.record():
            y = net(x)
        y.backward(dy)
        mx.nd.waitall()
    return run


def inference(net, x):
    def run():
        net(x).wait_to_read()
    return run


def add_relu_contenders(shape=(2, 1024, 1024)):
    """Fused add+relu and the stock ``nd.relu(a + b)`` on the same inputs (2M elements)."""
    a, b = (mx.nd.random.normal(shape=shape) for _ in range(2))
    fused = AddReLU()
    return {"fused": lambda: fused(a, b).wait_to_read(),
            "stock": lambda: mx.nd.relu(a + b).wait_to_read()}


def timed_call(fn):
    """Seconds of one call of fn: the float fn returns, if it does (a proxy timing a call in
    another process, as bench/peers.py's), else measured around it."""
    t0 = time.perf_counter()
    r = fn()
    dt = time.perf_counter() - t0
    return r if isinstance(r, float) else dt


# In each round, each contender runs untimed for SETTLE_S seconds (at least one call), then
# timed for BLOCK_S seconds (at least one call, each call a sample). After a call, each of
# the libraries here (the fused kernels' threads, MXNet's and PyTorch's OpenMP threads) keeps
# a processor spinning: 12-15 ms of CPU time after a batch-1 (1, 256, 256) k3 inference, in
# this process and in PyTorch's (measured on 2 processors, 2026-12-03). Sharing a processor
# with the next contender, that spin lasts up to twice as long in wall time; with SETTLE_S at
# 20 ms, the contender after PyTorch's ran 1.1-1.3x slower than alone at that shape. SETTLE_S
# outlasts it.
SETTLE_S = 0.06
BLOCK_S = 0.005


def timed_block(fn, settle_s=SETTLE_S, block_s=BLOCK_S):
    """Samples of fn: untimed for settle_s (at least one call), then timed for block_s."""
    t_end = time.perf_counter() + settle_s
    fn()
    while time.perf_counter() < t_end:
        fn()
    samples, t_end = [], time.perf_counter() + block_s
    while True:
        samples.append(timed_call(fn))
        if time.perf_counter() >= t_end:
            return samples


def interleaved_times(contenders, reps, warmup=2, settle_s=SETTLE_S, block_s=BLOCK_S):
    """Seconds of each timed call of each contender (see timed_call), from reps rounds after
    warmup rounds. Each round runs every contender, in an order that changes from round to
    round (round_order), so that machine noise hits all of them alike; within a round each
    contender first runs untimed for settle_s (at least once), so that what the previous one
    left behind (threads still spinning, here or in PyTorch's process) is spent there, then
    timed for block_s (at least once): each is timed in its own steady state, as a program
    running only it would see it. (How a fused layer fares right after a stock one is measured
    on its own: bench/test_cpu.py's alone/alternating rows, and the whole-model rows.)"""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times = {k: [] for k in contenders}
    for i in range(reps):
        for k in round_order(list(contenders), i):
            times[k] += timed_block(contenders[k], settle_s, block_s)
    return times


def round_order(names, i):
    """The order of round i: a permutation of names, a fixed one for each i (seeded), so that
    each contender starts rounds and follows every other one alike (a plain rotation would
    have each follow always the same one, and take whatever that one leaves behind)."""
    return [names[j] for j in np.random.default_rng(i).permutation(len(names))]


def interleaved_medians(contenders, reps, warmup=2):
    """Median seconds per call of each contender (see interleaved_times)."""
    return {k: float(np.median(v))
            for k, v in interleaved_times(contenders, reps, warmup).items()}


def best_stock(medians):
    """(name, seconds) of the fastest stock contender in medians."""
    stock = {k: v for k, v in medians.items() if k.startswith("stock")}
    name = min(stock, key=stock.get)
    return name, stock[name]


def _as_4d(a):
    """A 4-D (N, C, 1, W) copy: its own array, as data kept 4-D through a network is."""
    return a.reshape((a.shape[0], a.shape[1], 1, a.shape[2])).copy()


def conv_contenders(shape, mode, x=None, dy=None, stock=None):
    """Fused and the stock forms (stock: names from STOCK_TRAIN or STOCK_INFER, default all of
    the mode's) for one shape on the same values; mode is 'train' or 'infer'."""
    if x is None:
        x = mx.nd.random.normal(shape=(shape.n, shape.c, shape.width))
    train = mode == "train"
    kinds = stock or (STOCK_TRAIN if train else STOCK_INFER)
    nets = {"fused": fused_block(shape)}
    nets.update((kind, stock_block(shape, kind)) for kind in kinds)
    inputs = {k: _as_4d(x) if k == "stock 4-D" else x for k in nets}
    if not train:
        return {k: inference(net, inputs[k]) for k, net in nets.items()}
    if dy is None:
        dy = mx.nd.random.normal(shape=(shape.n, shape.out_channels, shape.out_width))
    grads = {k: _as_4d(dy) if k == "stock 4-D" else dy for k in nets}
    # A layer inside a network: its input needs a gradient too (PyTorch's peer likewise).
    for a in inputs.values():
        a.attach_grad()
    return {k: training_step(net, inputs[k], grads[k]) for k, net in nets.items()}


# Ways a training step runs, for configuration_contenders: (hybridize flags, grad_req).
CONFIGURATIONS = {
    "hybridize()": ({}, "write"),
    "hybridize(static_alloc)": ({"static_alloc": True, "static_shape": True}, "write"),
    "grad_req='add'": ({}, "add"),
}


def configuration_contenders(shape, configuration, x=None, dy=None):
    """A training step of the fused block (its default implementation, and the CustomOp for
    comparison) and of the stock 4-D workaround, in one of CONFIGURATIONS, on the same
    values."""
    flags, grad_req = CONFIGURATIONS[configuration]
    if x is None:
        x = mx.nd.random.normal(shape=(shape.n, shape.c, shape.width))
    if dy is None:
        dy = mx.nd.random.normal(shape=(shape.n, shape.out_channels, shape.out_width))
    x4, dy4 = _as_4d(x), _as_4d(dy)
    x.attach_grad(grad_req)
    x4.attach_grad(grad_req)
    nets = {"fused": fused_block(shape, **flags),
            "fused CustomOp": fused_block(shape, use_native=False, **flags),
            "stock 4-D": stock_block(shape, "stock 4-D", **flags)}
    for net in nets.values():
        for p in net.collect_params().values():
            if p.grad_req != "null":
                p.grad_req = grad_req
    return {name: training_step(net, x4 if name == "stock 4-D" else x,
                                dy4 if name == "stock 4-D" else dy)
            for name, net in nets.items()}


# Whole models -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """A 1-D ResNet-18: stem (conv k7 s2 + BatchNorm + relu, max-pool 3 s2), four stages of two
    BasicBlock1D (the first of stages 2-4 strided, with a 1x1 downsample), global average
    pooling, Dense; on input (n, c_in, width)."""
    name: str = "resnet18-1d"
    n: int = 16
    c_in: int = 16
    width: int = 1024
    classes: int = 10
    channels: tuple = (64, 128, 256, 512)
    stem_kernel: int = 7

    def conv_layers(self):
        """[(ConvLayer, input width)] of every conv in forward order (stem first)."""
        k = self.stem_kernel
        stem = ConvLayer(self.c_in, self.channels[0], k, stride=2, pad=k // 2)
        out = [(stem, self.width)]
        width = conv1d_out_width(stem.out_width(self.width), 3, 2, 1)  # the max-pool
        cin = self.channels[0]
        for i, c in enumerate(self.channels):
            for j in range(2):
                stride = 2 if i > 0 and j == 0 else 1
                first = ConvLayer(cin, c, 3, stride, 1)
                out += [(first, width), (ConvLayer(c, c, 3, 1, 1), first.out_width(width))]
                if stride > 1 or cin != c:
                    out.append((ConvLayer(cin, c, 1, stride), width))
                width, cin = first.out_width(width), c
        return out

    @property
    def conv_gflop(self):
        return sum(layer.gflop(self.n, w) for layer, w in self.conv_layers())

    @property
    def train_gflop(self):
        """Three times the forward convolutions, except the stem's data gradient (the input
        needs none)."""
        stem, w = self.conv_layers()[0]
        return 3 * self.conv_gflop - stem.gflop(self.n, w)

    @property
    def label(self):
        return f"{self.name} {(self.n, self.c_in, self.width)}"


MODEL = ModelShape()


class StockBasicBlock(gluon.HybridBlock):
    """gluon-cv's BasicBlockV1 from stock layers, in 1-D (Conv1D on NCW) or kept 4-D (Conv2D
    with kernels (1, k) on (N, C, 1, W)): relu(body(x) + downsample(x))."""

    def __init__(self, channels, stride, downsample, in_channels, four_d=False, **kw):
        super().__init__(**kw)

        def conv(c, k, s, cin):
            if four_d:
                return nn.Conv2D(c, (1, k), strides=(1, s), padding=(0, k // 2),
                                 use_bias=False, in_channels=cin)
            return nn.Conv1D(c, k, strides=s, padding=k // 2, use_bias=False, in_channels=cin)
        with self.name_scope():
            self.body = nn.HybridSequential()
            self.body.add(conv(channels, 3, stride, in_channels),
                          nn.BatchNorm(in_channels=channels), nn.Activation("relu"),
                          conv(channels, 3, 1, channels), nn.BatchNorm(in_channels=channels))
            self.downsample = None
            if downsample:
                self.downsample = nn.HybridSequential()
                self.downsample.add(conv(channels, 1, stride, in_channels),
                                    nn.BatchNorm(in_channels=channels))

    def hybrid_forward(self, F, x):
        skip = self.downsample(x) if self.downsample is not None else x
        return F.Activation(self.body(x) + skip, act_type="relu")


def stock_resnet1d(m=MODEL, four_d=False):
    """m's model from stock Gluon layers, initialized and hybridized; four_d: on (N, C, 1, W)."""
    k = m.stem_kernel
    net = nn.HybridSequential()
    with net.name_scope():
        if four_d:
            net.add(nn.Conv2D(m.channels[0], (1, k), strides=(1, 2), padding=(0, k // 2),
                              use_bias=False, in_channels=m.c_in))
        else:
            net.add(nn.Conv1D(m.channels[0], k, strides=2, padding=k // 2, use_bias=False,
                              in_channels=m.c_in))
        net.add(nn.BatchNorm(in_channels=m.channels[0]), nn.Activation("relu"))
        net.add(nn.MaxPool2D((1, 3), (1, 2), (0, 1)) if four_d else nn.MaxPool1D(3, 2, 1))
        cin = m.channels[0]
        for i, c in enumerate(m.channels):
            for j in range(2):
                stride = 2 if i > 0 and j == 0 else 1
                net.add(StockBasicBlock(c, stride, stride > 1 or cin != c, cin, four_d))
                cin = c
        net.add(nn.GlobalAvgPool2D() if four_d else nn.GlobalAvgPool1D(),
                nn.Dense(m.classes, in_units=cin))
    # Every shape is given, so that the Parameters exist before any forward: MKLDNN's
    # inference convolution reorders its weights in place (asynchronously), and copying into
    # a reordered array fails.
    net.initialize(mx.init.Xavier())
    net.hybridize()
    return net


def fused_resnet1d(m=MODEL, stock=None):
    """``fusedres.fuse()`` applied to a stock 1-D model (a copy of stock's parameters when
    given, so that both compute the same function); hybridized."""
    from .fuse import fuse
    net = stock_resnet1d(m)
    if stock is not None:  # before either has run a forward (see stock_resnet1d)
        for mine, theirs in zip(net.collect_params().values(), stock.collect_params().values()):
            mine.set_data(theirs.data())
        mx.nd.waitall()
    report = fuse(net)
    expected = len(m.conv_layers())
    if len(report.fused) != expected or report.left:
        raise RuntimeError(f"fuse() fused {len(report.fused)} of {expected} runs:\n{report}")
    net.hybridize()
    return net


def model_contenders(mode, m=MODEL, x=None, dy=None):
    """The fused model, the stock model kept 4-D and (inference) the stock 1-D model on the
    same values; a training step is forward + backward (no optimizer update, the input needs
    no gradient)."""
    if x is None:
        x = mx.nd.random.normal(shape=(m.n, m.c_in, m.width))
    stock1d = stock_resnet1d(m)
    nets = {"fused": fused_resnet1d(m, stock1d), "stock 4-D": stock_resnet1d(m, four_d=True)}
    if mode != "train":
        nets["stock Conv1D"] = stock1d
    inputs = {k: _as_4d(x) if k == "stock 4-D" else x for k in nets}
    if mode != "train":
        return {k: inference(net, inputs[k]) for k, net in nets.items()}
    if dy is None:
        dy = mx.nd.random.normal(shape=(m.n, m.classes))
    return {k: training_step(net, inputs[k], dy) for k, net in nets.items()}
