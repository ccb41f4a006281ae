"""1-D pooling blocks that are fast after the fused blocks: ``MaxPool1D`` and ``AvgPool1D``.

MXNet 1.9.1 runs 1-D pooling through oneDNN, which is slow on the plain NCW arrays the fused
ops produce (about 7-10 ms for (16, 64, 512) on 2 threads: in a 1-D ResNet the stem's max
pooling took longer than its conv). These are ``nn.MaxPool1D`` / ``nn.AvgPool1D`` (subclasses,
same arguments, same results) whose CPU forward and backward run fusedres's ``_fusedres_pool1d``
operator: one pass over the rows, with MXNet's window, padding, ``ceil_mode`` and
``count_include_pad`` rules, and its max that skips NaN. On GPUs (and for float16) they run
MXNet's own Pooling. ``fusedres.fuse`` puts them in place of the stock blocks.
"""
import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from ..ops import dispatch, native
from ..ops.errors import translate_errors


class _Pool1D:
    """The shared forward of MaxPool1D and AvgPool1D (a mixin over Gluon's _Pooling)."""

    def _setup(self, layout, use_native):
        if layout != "NCW":
            raise ValueError(f"layout must be 'NCW', got {layout!r}")
        self._use_native = use_native
        self._ctx_hint = None
        self._graph_key = None

    def forward(self, x, *args):
        self._ctx_hint = x.context if isinstance(x, mx.nd.NDArray) else None
        if self._ctx_hint is not None:
            if x.ndim != 3:
                raise ValueError(f"data must be 3-D (batch, channels, width), got shape "
                                 f"{x.shape}")
            if x.dtype not in (np.float32, np.float64):
                self._ctx_hint = "stock"   # float16 and others: MXNet's Pooling
            # A graph built for another device or dtype would run the other implementation.
            key = (x.context.device_type, self._ctx_hint == "stock")
            if self._active and key != self._graph_key:
                self._clear_cached_op()
            self._graph_key = key
        with translate_errors():
            return super().forward(x, *args)

    def _native(self, F):
        if self._ctx_hint == "stock":
            return False
        ctx = self._ctx_hint if F is mx.nd else None
        return dispatch.choose(self._use_native, ctx) is native

    def hybrid_forward(self, F, x):
        k = self._kwargs
        if not self._native(F):
            return super().hybrid_forward(F, x)
        return native.pool1d(F, x, kernel=k["kernel"][0], stride=k["stride"][0],
                             pad=k["pad"][0], pool_type=k["pool_type"],
                             pooling_convention=k["pooling_convention"],
                             count_include_pad=k.get("count_include_pad", True), name="fwd")


class MaxPool1D(_Pool1D, nn.MaxPool1D):
    """``nn.MaxPool1D`` (same arguments and results) with fusedres's CPU pooling operator.

    use_native : None, True or False
        None: the operator on the CPU, MXNet's Pooling on GPUs; True requires the operator;
        False always takes MXNet's Pooling.
    """

    def __init__(self, pool_size=2, strides=None, padding=0, layout="NCW", ceil_mode=False,
                 use_native=None, **kwargs):
        super().__init__(pool_size, strides, padding, layout, ceil_mode, **kwargs)
        self._setup(layout, use_native)


class AvgPool1D(_Pool1D, nn.AvgPool1D):
    """``nn.AvgPool1D`` (same arguments and results) with fusedres's CPU pooling operator.

    use_native : as in ``MaxPool1D``.
    """

    def __init__(self, pool_size=2, strides=None, padding=0, layout="NCW", ceil_mode=False,
                 count_include_pad=True, use_native=None, **kwargs):
        super().__init__(pool_size, strides, padding, layout, ceil_mode, count_include_pad,
                         **kwargs)
        self._setup(layout, use_native)


def pool1d_from(block):
    """The fusedres block computing what a stock ``nn.MaxPool1D``/``nn.AvgPool1D`` computes
    (same arguments, prefix and hybridization), or None when ``block`` is not one."""
    if type(block) not in (nn.MaxPool1D, nn.AvgPool1D):
        return None
    k = block._kwargs
    if k["layout"] != "NCW" or k["global_pool"] or k["pad"][0] >= k["kernel"][0]:
        return None  # (pad >= kernel: refused by the operator; left to MXNet's own check)
    common = dict(pool_size=k["kernel"], strides=k["stride"], padding=k["pad"],
                  ceil_mode=k["pooling_convention"] == "full", prefix=block.prefix)
    if type(block) is nn.MaxPool1D:
        new = MaxPool1D(**common)
    else:
        new = AvgPool1D(count_include_pad=k.get("count_include_pad", True), **common)
    if block._active:
        new.hybridize(True, **dict(block._flags))
    return new
