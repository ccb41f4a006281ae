"""The shared benchmark table and the like-for-like contenders timed on it.

Used by ``python -m fusedres`` and by the pytest-benchmark suites in bench/, so both time the
same shapes against the same stock paths.
"""
import time
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn

from .nn import AddReLU, ConvBNReLU1D
from .reference import conv1d_out_width


@dataclass(frozen=True)
class BenchShape:
    name: str
    n: int
    c: int
    width: int
    kernel: int
    stride: int = 1
    pad: int = 0
    dilation: int = 1

    @property
    def out_width(self):
        return conv1d_out_width(self.width, self.kernel, self.stride, self.pad, self.dilation)

    @property
    def conv_gflop(self):
        """One convolution (forward); a training step does three."""
        return 2.0 * self.n * self.c * self.out_width * self.c * self.kernel / 1e9

    def conv_kwargs(self):
        return dict(strides=self.stride, padding=self.pad, dilation=self.dilation)


SHAPES = [
    BenchShape("reference", 32, 64, 1024, 3, pad=1),
    BenchShape("wide-k5", 8, 256, 512, 5, pad=2),
    BenchShape("long-stride2", 64, 32, 4096, 3, stride=2, pad=1),
    BenchShape("pointwise-k1", 16, 128, 256, 1),
    BenchShape("audio-k9-dil2", 4, 64, 16000, 9, pad=4, dilation=2),
    BenchShape("tiny", 2, 8, 16, 3, pad=1),
]


class _StockConv1D(gluon.HybridBlock):
    """Conv1D -> BatchNorm -> relu exactly as a stock Gluon user writes it."""

    def __init__(self, s, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.conv = nn.Conv1D(s.c, s.kernel, in_channels=s.c, **s.conv_kwargs())
            self.bn = nn.BatchNorm(in_channels=s.c)

    def hybrid_forward(self, F, x):
        return F.relu(self.bn(self.conv(x)))


class _StockConv2DWorkaround(gluon.HybridBlock):
    """The users' workaround for the MXNet 1.9.1 Conv1D+BatchNorm backward crash: the same
    conv as a Conv2D with kernel (1, k) on (N, C, 1, W)."""

    def __init__(self, s, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.conv = nn.Conv2D(s.c, (1, s.kernel), strides=(1, s.stride), padding=(0, s.pad),
                                  dilation=(1, s.dilation), in_channels=s.c)
            self.bn = nn.BatchNorm(in_channels=s.c)

    def hybrid_forward(self, F, x):
        y = F.relu(self.bn(self.conv(F.expand_dims(x, axis=2))))
        return F.squeeze(y, axis=2)


def stock_block(shape, for_training, **hybridize):
    """The fastest stock path that works: 1-D Conv1D crashes in backward with MKLDNN on at
    these channel counts (multiples of 8), so training uses the Conv2D workaround."""
    net = _StockConv2DWorkaround(shape) if for_training else _StockConv1D(shape)
    net.initialize(mx.init.Xavier())
    net.hybridize(**hybridize)
    return net


def fused_block(shape, use_native=None, **hybridize):
    net = ConvBNReLU1D(shape.c, shape.kernel, in_channels=shape.c, use_native=use_native,
                       **shape.conv_kwargs())
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


def interleaved_medians(contenders, reps, warmup=2):
    """Median seconds per call of each contender, timed round-robin (the order rotating from
    round to round) so that machine noise, and whatever one contender leaves behind for the
    next, hits all of them alike."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times = {k: [] for k in contenders}
    names = list(contenders)
    for i in range(reps):
        r = i % len(names)
        for k in names[r:] + names[:r]:
            t0 = time.perf_counter()
            contenders[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def conv_contenders(shape, mode, x=None, dy=None):
    """Fused and stock callables for one shape on the same inputs; mode is 'train' or
    'infer'."""
    if x is None:
        x = mx.nd.random.normal(shape=(shape.n, shape.c, shape.width))
    fused, stock = fused_block(shape), stock_block(shape, for_training=mode == "train")
    if mode == "train":
        if dy is None:
            dy = mx.nd.random.normal(shape=(shape.n, shape.c, shape.out_width))
        # A layer inside a network: its input needs a gradient too (PyTorch's peer likewise).
        x.attach_grad()
        return {"fused": training_step(fused, x, dy), "stock": training_step(stock, x, dy)}
    return {"fused": inference(fused, x), "stock": inference(stock, x)}


# Ways a training step runs, for configuration_contenders: (hybridize flags, grad_req).
CONFIGURATIONS = {
    "hybridize()": ({}, "write"),
    "hybridize(static_alloc)": ({"static_alloc": True, "static_shape": True}, "write"),
    "grad_req='add'": ({}, "add"),
}


def configuration_contenders(shape, configuration, x=None, dy=None):
    """A training step of the fused block (its default implementation, and the CustomOp for
    comparison) and of the stock workaround, in one of CONFIGURATIONS, on the same inputs."""
    flags, grad_req = CONFIGURATIONS[configuration]
    if x is None:
        x = mx.nd.random.normal(shape=(shape.n, shape.c, shape.width))
    if dy is None:
        dy = mx.nd.random.normal(shape=(shape.n, shape.c, shape.out_width))
    x.attach_grad(grad_req)
    nets = {"fused": fused_block(shape, **flags),
            "fused CustomOp": fused_block(shape, use_native=False, **flags),
            "stock": stock_block(shape, for_training=True, **flags)}
    for net in nets.values():
        for p in net.collect_params().values():
            if p.grad_req != "null":
                p.grad_req = grad_req
    return {name: training_step(net, x, dy) for name, net in nets.items()}
