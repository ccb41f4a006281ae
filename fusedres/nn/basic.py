"""Drop-in HybridBlocks: ConvBNReLU1D (Conv1D -> BatchNorm -> relu), ConvBN1D and AddReLU."""
import numbers
import os
import warnings

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, Parameter

from .. import ops
from ..ops import native, translate_errors
from ..ops._common import marked_inputs


def _single(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise ValueError(f"{name} must be an int or a 1-tuple for a 1-D conv, got {value}")
        value = value[0]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


class _WatchedParameter(Parameter):
    """A Parameter of a graph built with the native ops, which cannot accumulate gradients:
    switching its grad_req to 'add' warns, since a hybridized parent keeps that graph."""

    @Parameter.grad_req.setter
    def grad_req(self, req):
        if req == "add" and self._grad_req != "add":
            warnings.warn(
                f"{self.name}: grad_req='add' on a parameter of a fused block whose graph was "
                "built with the native ops, which overwrite gradients; call hybridize() again "
                "on the hybridized block that contains it, so that it is rebuilt with the "
                "CustomOps (a fused block called directly rebuilds by itself)", RuntimeWarning,
                stacklevel=2)
        Parameter.grad_req.fset(self, req)


class _TranslatingBlock(HybridBlock):
    """Base of the fused blocks: picks the op implementation for each graph it builds, and
    re-raises validation errors that MXNet hides behind a bare MXNetError with their message.

    Implementations: the native ops (``fusedres.ops.native``, an MXNet operator library with a
    built-in op's per-call cost) where they compute exactly what the CustomOps compute, else
    the CustomOps (``fusedres.ops``). ``use_native``: None (default) decides with
    ``native.native_ok`` (library loaded, CPU, no grad_req='add', not hybridized with
    static_alloc, no input with grad_req='add', $FUSEDRES_NATIVE not '0'); True requires
    the native ops; False never uses them. The choice is made when a graph is built; a fused
    block called directly rebuilds its graph when grad_req or its inputs change, but inside a
    hybridized parent call the parent's hybridize() again after switching grad_req to 'add'.
    """

    def __init__(self, use_native=None, **kwargs):
        super().__init__(**kwargs)
        self._use_native = use_native
        self._static_alloc = False
        self._ctx_hint = None
        self._marked_input = False
        self._graph_key = None

    def hybridize(self, active=True, **kwargs):
        self._static_alloc = bool(kwargs.get("static_alloc", False))
        super().hybridize(active, **kwargs)

    def forward(self, *args):
        arrays = [a for a in args if isinstance(a, mx.nd.NDArray)]
        # Called with Symbols: inside a hybridized parent, whose data we cannot see.
        self._ctx_hint = arrays[0].context if arrays else None
        # An input whose gradient accumulates (grad_req='add') needs the CustomOps.
        self._marked_input = any(marked_inputs.may_accumulate(a) for a in arrays)
        if self._active and arrays:
            # The implementation is chosen when the graph is built: build again when what the
            # choice depends on has changed since (e.g. grad_req switched to 'add').
            key = (self._marked_input, self._ctx_hint,
                   tuple(p.grad_req for p in self._reg_params.values()))
            if key != self._graph_key:
                self._clear_cached_op()
                self._graph_key = key
        with translate_errors(), native.translate_errors():
            return super().forward(*args)

    def _context(self):
        """The data's context if this block was called directly, else its parameters'."""
        if self._ctx_hint is not None:
            return self._ctx_hint
        for p in self.params.values():
            try:
                return p.list_ctx()[0]
            except RuntimeError:  # not initialized yet
                continue
        return None

    def _impl_kwargs(self):
        """The implementation for the graph being built now, and its extra arguments: the
        CustomOps get their inputs in the plain layout on the CPU (see ops._plain)."""
        impl = self._impl()
        if impl is native:
            return impl, {}
        ctx = self._context()
        return impl, {"plain_layout": ctx is None or ctx.device_type != "gpu"}

    def _impl(self):
        """fusedres.ops.native or fusedres.ops, for the graph being built now."""
        if self._use_native is False or os.environ.get("FUSEDRES_NATIVE", "1") == "0":
            return ops
        ok, why = native.native_ok(self.collect_params().values(), ctx=self._context(),
                                   static_alloc=self._static_alloc)
        if ok and self._marked_input:
            ok, why = False, "an input's gradient accumulates (grad_req='add')"
        if ok:
            for p in self.collect_params().values():
                if p._differentiable:
                    p.__class__ = _WatchedParameter
            return native
        if self._use_native:
            raise ValueError(f"use_native=True but the native ops cannot be used: {why}")
        return ops


class ConvBNReLU1D(_TranslatingBlock):
    r"""Fused ``Conv1D -> BatchNorm -> Activation('relu')`` over NCW data.

    Computes exactly what ``nn.Conv1D(channels, kernel_size, ...)`` followed by
    ``nn.BatchNorm(momentum, epsilon)`` and ``nn.Activation('relu')`` compute, in one op, with
    the same parameters under the same names, shapes and initializers, so trained parameters
    of the stock blocks load into it.

    Parameters
    ----------
    channels : int
        Number of output channels.
    kernel_size : int or tuple of one int
    strides : int or tuple of one int, default 1
    padding : int or tuple of one int, default 0
        Zero padding on both sides.
    dilation : int or tuple of one int, default 1
    groups : int, default 1
        Grouped convolution: channels and in_channels must both be divisible by it.
    use_bias : bool, default True
        Whether the convolution has a bias (redundant before BatchNorm, but stock Conv1D has
        one by default, and keeping it lets stock parameters load unchanged).
    momentum : float, default 0.9
        Running statistics: ``running = momentum * running + (1 - momentum) * batch``.
    epsilon : float, default 1e-5
    use_global_stats : bool, default False
        Normalize with the running statistics in training too.
    in_channels : int, default 0
        Input channels; 0 means infer from the first input.
    activation : 'relu' or None, default 'relu'
        None gives Conv1D -> BatchNorm alone (see ``ConvBN1D``), e.g. before a residual join.
    weight_initializer, bias_initializer, gamma_initializer, beta_initializer,
    running_mean_initializer, running_variance_initializer
        As in ``nn.Conv1D`` and ``nn.BatchNorm``.
    use_native : None, True or False
        Which implementation runs the op: see the base class; None picks the fastest one
        that computes the same result.

    Inputs:
        - **data**: (batch_size, in_channels, width), float32 or float64 (float16 on GPU).

    Outputs:
        - **out**: (batch_size, channels, out_width), with
          ``out_width = floor((width + 2 * padding - dilation * (kernel_size - 1) - 1)
          / strides) + 1``.
    """

    def __init__(self, channels, kernel_size, strides=1, padding=0, dilation=1, groups=1,
                 use_bias=True, momentum=0.9, epsilon=1e-5, use_global_stats=False,
                 in_channels=0, activation="relu", layout="NCW", weight_initializer=None,
                 bias_initializer="zeros", gamma_initializer="ones", beta_initializer="zeros",
                 running_mean_initializer="zeros", running_variance_initializer="ones",
                 use_native=None, **kwargs):
        super().__init__(use_native=use_native, **kwargs)
        if activation not in ("relu", None):
            raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
        self._relu = activation == "relu"
        if layout != "NCW":
            raise ValueError(f"layout must be 'NCW', got {layout!r}")
        self._channels = _single(channels, "channels")
        self._kernel = _single(kernel_size, "kernel_size")
        self._stride = _single(strides, "strides")
        self._pad = _single(padding, "padding")
        self._dilate = _single(dilation, "dilation")
        self._groups = _single(groups, "groups")
        self._in_channels = _single(in_channels, "in_channels")
        for name, value, low in (("channels", self._channels, 1), ("kernel_size", self._kernel, 1),
                                 ("strides", self._stride, 1), ("padding", self._pad, 0),
                                 ("dilation", self._dilate, 1), ("groups", self._groups, 1),
                                 ("in_channels", self._in_channels, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self._channels % self._groups:
            raise ValueError(f"groups ({self._groups}) must divide channels ({self._channels})")
        if self._in_channels % self._groups:
            raise ValueError(
                f"groups ({self._groups}) must divide in_channels ({self._in_channels})")
        self._use_bias = bool(use_bias)
        self._momentum, self._epsilon = float(momentum), float(epsilon)
        self._use_global_stats = bool(use_global_stats)
        c = self._channels
        with self.name_scope():
            self.weight = self.params.get(
                "weight", shape=(c, self._in_channels // self._groups, self._kernel),
                init=weight_initializer, allow_deferred_init=True)
            self.bias = (self.params.get("bias", shape=(c,), init=bias_initializer,
                                         allow_deferred_init=True) if self._use_bias else None)
            self.gamma = self.params.get("gamma", shape=(c,), init=gamma_initializer,
                                         allow_deferred_init=True)
            self.beta = self.params.get("beta", shape=(c,), init=beta_initializer,
                                        allow_deferred_init=True)
            self.running_mean = self.params.get(
                "running_mean", grad_req="null", shape=(c,), init=running_mean_initializer,
                allow_deferred_init=True, differentiable=False)
            self.running_var = self.params.get(
                "running_var", grad_req="null", shape=(c,), init=running_variance_initializer,
                allow_deferred_init=True, differentiable=False)

    def cast(self, dtype):
        """As ``nn.Conv1D`` + ``nn.BatchNorm``: under float16 the BatchNorm parameters and running
        statistics stay float32."""
        super().cast(dtype)
        if np.dtype(dtype) == np.float16:
            for p in (self.gamma, self.beta, self.running_mean, self.running_var):
                p.cast("float32")

    def hybrid_forward(self, F, x, weight, gamma, beta, running_mean, running_var, bias=None):
        impl, extra = self._impl_kwargs()
        return impl.conv1d_bn_relu(
            x, weight, bias, gamma, beta, running_mean, running_var, kernel=self._kernel,
            num_filter=self._channels, stride=self._stride, pad=self._pad,
            dilate=self._dilate, num_group=self._groups, eps=self._epsilon,
            momentum=self._momentum, use_global_stats=self._use_global_stats, relu=self._relu,
            name="fwd", F=F, **extra)

    def __repr__(self):
        in_ch = self.weight.shape[1] * self._groups if self.weight.shape[1] else None
        s = (f"{self.__class__.__name__}({in_ch if in_ch else 'None'} -> {self._channels}, "
             f"kernel_size=({self._kernel},), stride=({self._stride},)")
        if self._pad:
            s += f", padding=({self._pad},)"
        if self._dilate != 1:
            s += f", dilation=({self._dilate},)"
        if self._groups != 1:
            s += f", groups={self._groups}"
        if not self._use_bias:
            s += ", bias=False"
        s += f", momentum={self._momentum}, eps={self._epsilon}"
        if self._use_global_stats:
            s += ", use_global_stats=True"
        return s + ")"


class ConvBN1D(ConvBNReLU1D):
    """Fused ``Conv1D -> BatchNorm`` without the relu: ``ConvBNReLU1D(activation=None)``.

    Used where the relu comes after a residual join (``ResidualBlock1D``'s last conv and its
    projection shortcut). Same parameters as ``ConvBNReLU1D`` except ``activation``.
    """

    def __init__(self, channels, kernel_size, **kwargs):
        if "activation" in kwargs:
            raise TypeError("ConvBN1D has no activation; use ConvBNReLU1D")
        super().__init__(channels, kernel_size, activation=None, **kwargs)


class AddReLU(_TranslatingBlock):
    """Fused ``relu(lhs + rhs)``: the residual join. Both inputs must have the same shape.

    Inputs:
        - **lhs**, **rhs**: arrays of the same shape and dtype.

    Outputs:
        - **out**: ``max(lhs + rhs, 0)``.
    """

    def hybrid_forward(self, F, lhs, rhs):
        impl, extra = self._impl_kwargs()
        return impl.add_relu(lhs, rhs, name="fwd", F=F, **extra)

    def __repr__(self):
        return f"{self.__class__.__name__}()"
