"""The conv1d_bn_relu op's attributes: one spec for blocks, ops and kernels (MXNet-free: the
CUDA wrappers below the ops use it too).

``ConvAttrs`` holds them under the op's names (MXNet's Convolution and BatchNorm: kernel,
num_filter, stride, pad, dilate, num_group, no_bias, eps, momentum, use_global_stats) plus
``relu``; it validates them with the argument's name in every message, computes the output
width, and converts to what each layer takes. csrc/conv_attrs.h mirrors it for the C++ side
(same limits and messages). The blocks speak Gluon's names (channels, kernel_size, strides,
padding, dilation, groups, use_bias, epsilon): ``ConvAttrs.from_gluon`` checks with those.
"""
import ast
import functools
import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

# The largest hyper-parameter, dimension or tensor size: MXNet 1.9.1's wheels index tensors
# with 32-bit integers, as Convolution's own int attributes are.
MAX_EXTENT = 2**31 - 1

# Gluon's names of the op's attributes, as the blocks take them.
GLUON_NAMES = dict(kernel="kernel_size", num_filter="channels", stride="strides", pad="padding",
                   dilate="dilation", num_group="groups", no_bias="use_bias", eps="epsilon",
                   momentum="momentum", use_global_stats="use_global_stats", relu="activation")


def _literal(value):
    """Attribute values arrive as Python values or (from MXNet) as their str()."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return value
    return value


def parse_int(value, name, minimum):
    v = _literal(value)
    if isinstance(v, (tuple, list)):
        if len(v) != 1:
            raise ValueError(f"{name} must be an int or a 1-tuple for a 1-D conv, got {value}")
        v = v[0]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    v = int(v)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if v > MAX_EXTENT:
        raise ValueError(f"{name} must be <= {MAX_EXTENT}, got {v}")
    return v


def parse_float(value, name):
    v = _literal(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf"):
        v = float(value)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(v)


def parse_bool(value, name):
    v = _literal(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        v = value.strip().lower() == "true"
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, numbers.Integral) and v in (0, 1)):
        return bool(v)
    raise TypeError(f"{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class ConvAttrs:
    """Validated attributes of conv1d_bn_relu (construct with ``parse`` or ``from_gluon``)."""
    kernel: int
    num_filter: int
    stride: int = 1
    pad: int = 0
    dilate: int = 1
    num_group: int = 1
    no_bias: bool = False
    eps: float = 1e-5
    momentum: float = 0.9
    use_global_stats: bool = False
    relu: bool = True

    @classmethod
    def parse(cls, names=None, **given):
        """From op attributes (values or MXNet's strings). ``names`` renames attributes in
        error messages (e.g. GLUON_NAMES)."""
        names = names or {}
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unexpected conv attribute {sorted(unknown)[0]!r}")
        for required in ("kernel", "num_filter"):
            if required not in given:
                raise ValueError(f"{names.get(required, required)} is required")
        n = lambda k: names.get(k, k)  # noqa: E731
        d = {f.name: f.default for f in fields(cls) if f.name not in ("kernel", "num_filter")}
        d.update(given)
        attrs = dict(
            kernel=parse_int(d["kernel"], n("kernel"), 1),
            num_filter=parse_int(d["num_filter"], n("num_filter"), 1),
            stride=parse_int(d["stride"], n("stride"), 1),
            pad=parse_int(d["pad"], n("pad"), 0),
            dilate=parse_int(d["dilate"], n("dilate"), 1),
            num_group=parse_int(d["num_group"], n("num_group"), 1),
            no_bias=parse_bool(d["no_bias"], n("no_bias")),
            eps=parse_float(d["eps"], n("eps")),
            momentum=parse_float(d["momentum"], n("momentum")),
            use_global_stats=parse_bool(d["use_global_stats"], n("use_global_stats")),
            relu=parse_bool(d["relu"], n("relu")))
        if not (math.isfinite(attrs["eps"]) and attrs["eps"] > 0):
            raise ValueError(f"{n('eps')} must be a finite number > 0, got {attrs['eps']}")
        if not 0 <= attrs["momentum"] <= 1:
            raise ValueError(f"{n('momentum')} must be in [0, 1], got {attrs['momentum']}")
        if attrs["num_filter"] % attrs["num_group"]:
            raise ValueError(f"{n('num_group')} ({attrs['num_group']}) must divide "
                             f"{n('num_filter')} ({attrs['num_filter']})")
        # MXNet's BatchNorm holds momentum as a C float (0.9 -> 0.8999999762); rounding the
        # same way makes the running statistics match the stock blocks bit for bit.
        attrs["momentum"] = float(np.float32(attrs["momentum"]))
        return cls(**attrs)

    @classmethod
    def from_gluon(cls, channels, kernel_size, strides=1, padding=0, dilation=1, groups=1,
                   use_bias=True, momentum=0.9, epsilon=1e-5, use_global_stats=False,
                   activation="relu"):
        """From a block's arguments, named as in Gluon's Conv1D and BatchNorm."""
        if activation not in ("relu", None):
            raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
        return cls.parse(
            names=GLUON_NAMES, kernel=kernel_size, num_filter=channels, stride=strides,
            pad=padding, dilate=dilation, num_group=groups,
            no_bias=not parse_bool(use_bias, "use_bias"), eps=epsilon, momentum=momentum,
            use_global_stats=use_global_stats, relu=activation == "relu")

    @property
    def extent(self):
        """Width the dilated kernel spans."""
        return self.dilate * (self.kernel - 1) + 1

    def out_width(self, width):
        return (width + 2 * self.pad - self.extent) // self.stride + 1

    def check_data(self, shape):
        """Raises ValueError (naming data, or the attribute at fault) unless the op can run on
        data of this (N, C, W) shape; returns the weight's shape."""
        shape = tuple(int(d) for d in shape)
        if len(shape) != 3:
            raise ValueError(f"data must be 3-D (batch, channels, width), got shape {shape}")
        n, c, width = shape
        if min(shape) < 1:
            raise ValueError(f"data must have no zero-size dimension, got shape {shape}")
        if n * c * width > MAX_EXTENT:
            raise ValueError(f"data has more than {MAX_EXTENT} elements: shape {shape}")
        if c % self.num_group:
            raise ValueError(f"num_group ({self.num_group}) must divide data's channels ({c})")
        if width + 2 * self.pad < self.extent:
            raise ValueError(f"kernel (dilated extent {self.extent}) is larger than the padded "
                             f"width ({width} + 2*{self.pad}) of data")
        out = self.out_width(width)
        if n * self.num_filter * out > MAX_EXTENT:
            raise ValueError(
                f"pad ({self.pad}) and stride ({self.stride}) give an output of {n} x "
                f"{self.num_filter} x {out} elements, more than {MAX_EXTENT}")
        weight = (self.num_filter, c // self.num_group, self.kernel)
        if weight[0] * weight[1] * weight[2] > MAX_EXTENT:
            raise ValueError(f"weight {weight} has more than {MAX_EXTENT} elements")
        return weight

    def check_weight(self, data_shape, weight_shape):
        """check_data, then raises ValueError unless weight_shape is the weight that data
        needs."""
        expected = self.check_data(data_shape)
        if tuple(weight_shape) != expected:
            raise ValueError(f"weight must have shape {expected} for data of shape "
                             f"{tuple(data_shape)}, got {tuple(weight_shape)}")

    @functools.cached_property
    def op_kwargs(self):
        """The attributes MXNet's ops take, leaving out those at their default: MXNet
        converts every attribute on each call (a third of a tiny op's per-call cost), and
        saved graphs get shorter. Computed once; do not modify."""
        out = dict(kernel=self.kernel, num_filter=self.num_filter)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in out and value != f.default:
                out[f.name] = value
        return out

    @classmethod
    def for_kernel(cls, data_shape, weight_shape, stride, pad, dilate, num_group, eps=1e-5,
                   momentum=0.9):
        """The checks of a kernel call (fusedres.cuda; csrc/conv_attrs.h's
        ``check_kernel_call`` for fusedres._C): the attributes, then data, then the weight's
        shape, which gives kernel and num_filter. Returns the attributes."""
        return _checked_kernel_call(tuple(int(d) for d in data_shape),
                                    tuple(int(d) for d in weight_shape), stride, pad, dilate,
                                    num_group, eps, momentum)

    def kernel_kwargs(self):
        """The hyper-parameters of the kernels (fusedres._C and fusedres.cuda), under the
        op's names."""
        return dict(stride=self.stride, pad=self.pad, dilate=self.dilate,
                    num_group=self.num_group, relu=self.relu)


# A kernel wrapper checks on every call (a GPU training step makes a dozen): the same shapes
# and hyper-parameters come back, so their checked attributes are kept (typed: True is not 1).
# Failures are not kept.
@functools.lru_cache(maxsize=256, typed=True)
def _checked_kernel_call(data_shape, weight_shape, stride, pad, dilate, num_group, eps,
                         momentum):
    if len(weight_shape) != 3:
        raise ValueError("weight must be 3-D (num_filter, channels / num_group, kernel), "
                         f"got shape {weight_shape}")
    if min(weight_shape) < 1:
        raise ValueError(f"weight must have no zero-size dimension, got shape {weight_shape}")
    attrs = ConvAttrs.parse(kernel=weight_shape[2], num_filter=weight_shape[0], stride=stride,
                            pad=pad, dilate=dilate, num_group=num_group, eps=eps,
                            momentum=momentum)
    attrs.check_weight(data_shape, weight_shape)
    return attrs


def check_dtypes(names, dtypes, allowed):
    """All tensors share the first known floating dtype; returns that numpy type (float32
    when none is known). Raises TypeError naming the tensor at fault."""
    known = [(n, np.dtype(t)) for n, t in zip(names, dtypes) if t is not None]
    if not known:
        return np.float32
    name0, first = known[0]
    if first.type not in allowed:
        kinds = " or ".join(np.dtype(t).name for t in allowed)
        raise TypeError(f"{name0} must be {kinds}, got {first.name}")
    for name, dt in known[1:]:
        if dt != first:
            raise TypeError(
                f"{name} must have the same dtype as {name0} ({first.name}), got {dt.name}")
    return first.type


__all__ = ["ConvAttrs", "GLUON_NAMES", "MAX_EXTENT", "check_dtypes", "parse_int", "parse_float",
           "parse_bool"]
