"""Drop-in HybridBlocks: ConvBNReLU1D (Conv1D -> BatchNorm -> relu), ConvBN1D and AddReLU."""
import dataclasses

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock

from .. import ops
from ..attrs import ConvAttrs, parse_int
from ..ops.errors import translate_errors


def _single(value, name, minimum=0):
    """An int hyper-parameter (or a 1-tuple of one), as the blocks take them."""
    return parse_int(value, name, minimum)


def params_context(params):
    """The context of the first initialized Parameter of params, or None."""
    for p in params:
        try:
            return p.list_ctx()[0]
        except RuntimeError:  # not initialized yet
            continue
    return None


class _FusedBlock(HybridBlock):
    """Base of the fused blocks: knows the data's device when a graph is built (the op's
    implementation depends on it, see fusedres.ops.dispatch) and re-raises validation errors
    that MXNet hides behind a bare MXNetError with their message.

    use_native: None (default) runs the MXNet operators on the CPU and the CustomOps on GPUs;
    False always takes the CustomOps; True requires the MXNet operators.
    """

    _input_names = ("data",)

    def __init__(self, use_native=None, **kwargs):
        super().__init__(**kwargs)
        self._use_native = use_native
        self._ctx_hint = None
        self._graph_device = None

    def forward(self, *args):
        arrays = [a for a in args if isinstance(a, mx.nd.NDArray)]
        # Called with Symbols: inside a hybridized parent, whose data we cannot see.
        self._ctx_hint = arrays[0].context if arrays else None
        if arrays:
            for name, a in zip(self._input_names, arrays):
                if 0 in a.shape:  # reaches shape inference as "unknown", which names nothing
                    raise ValueError(f"{name} must have no zero-size dimension, got shape "
                                     f"{a.shape}")
            device = self._ctx_hint.device_type
            if self._active and device != self._graph_device:
                self._clear_cached_op()  # built for another device: another implementation
            self._graph_device = device
        with translate_errors():
            return super().forward(*args)

    def _context(self):
        """The data's context if this block was called directly, else its parameters'."""
        if self._ctx_hint is not None:
            return self._ctx_hint
        return params_context(self.params.values())

    def _op_args(self, F):
        return dict(use_native=self._use_native, ctx=None if F is mx.nd else self._context())


class ConvBNReLU1D(_FusedBlock):
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
        Which implementation runs the op (see fusedres.ops.dispatch): None takes the MXNet
        operator on the CPU and the CustomOp on GPUs.

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
        if layout != "NCW":
            raise ValueError(f"layout must be 'NCW', got {layout!r}")
        self._attrs = ConvAttrs.from_gluon(
            channels, kernel_size, strides=strides, padding=padding, dilation=dilation,
            groups=groups, use_bias=use_bias, momentum=momentum, epsilon=epsilon,
            use_global_stats=use_global_stats, activation=activation)
        a = self._attrs
        # As Gluon's Conv1D: the number of channels in and out.
        self._channels, self._in_channels = a.num_filter, _single(in_channels, "in_channels")
        if self._in_channels % a.num_group:
            raise ValueError(
                f"groups ({a.num_group}) must divide in_channels ({self._in_channels})")
        c = self._channels
        with self.name_scope():
            self.weight = self.params.get(
                "weight", shape=(c, self._in_channels // a.num_group, a.kernel),
                init=weight_initializer, allow_deferred_init=True)
            self.bias = (self.params.get("bias", shape=(c,), init=bias_initializer,
                                         allow_deferred_init=True) if not a.no_bias else None)
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

    @property
    def _kwargs(self):
        """The op's attributes under the op's names (kernel, num_filter, stride, pad, dilate,
        num_group, no_bias, eps, momentum, use_global_stats, relu), as Gluon's Conv1D keeps its
        own in ``_kwargs``: a fresh dict of ``self._attrs``, the one copy."""
        return dataclasses.asdict(self._attrs)

    def cast(self, dtype):
        """As ``nn.Conv1D`` + ``nn.BatchNorm``: under float16 the BatchNorm parameters and running
        statistics stay float32."""
        super().cast(dtype)
        if np.dtype(dtype) == np.float16:
            for p in (self.gamma, self.beta, self.running_mean, self.running_var):
                p.cast("float32")

    def hybrid_forward(self, F, x, weight, gamma, beta, running_mean, running_var, bias=None):
        return ops.run_conv1d_bn_relu(F, self._attrs, x, weight, bias, gamma, beta,
                                      running_mean, running_var, name="fwd",
                                      **self._op_args(F))

    def __repr__(self):
        a = self._attrs
        in_ch = self.weight.shape[1] * a.num_group if self.weight.shape[1] else None
        s = (f"{self.__class__.__name__}({in_ch if in_ch else 'None'} -> {self._channels}, "
             f"kernel_size=({a.kernel},), stride=({a.stride},)")
        if a.pad:
            s += f", padding=({a.pad},)"
        if a.dilate != 1:
            s += f", dilation=({a.dilate},)"
        if a.num_group != 1:
            s += f", groups={a.num_group}"
        if a.no_bias:
            s += ", bias=False"
        # momentum as given: the op holds it rounded to a C float, as MXNet's BatchNorm does
        s += f", momentum={a.momentum:.7g}, eps={a.eps}"
        if a.use_global_stats:
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


class AddReLU(_FusedBlock):
    """Fused ``relu(lhs + rhs)``: the residual join. Both inputs must have the same shape.

    Inputs:
        - **lhs**, **rhs**: arrays of the same shape and dtype.

    Outputs:
        - **out**: ``max(lhs + rhs, 0)``.
    """

    _input_names = ("lhs", "rhs")

    def hybrid_forward(self, F, lhs, rhs):
        return ops.run_add_relu(F, lhs, rhs, name="fwd", **self._op_args(F))

    def __repr__(self):
        return f"{self.__class__.__name__}()"
