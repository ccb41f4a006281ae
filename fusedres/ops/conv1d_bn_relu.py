"""CustomOp ``fusedres_conv1d_bn_relu``: relu(batchnorm(conv1d(data))) in one op.

Arguments: data (N, C, W), weight (num_filter, C / num_group, kernel), bias (num_filter,)
unless no_bias, gamma, beta (num_filter,). Auxiliary states: running_mean, running_var.
(MXNet's Initializer cannot set up auxiliary states that ``mx.sym.Custom`` creates, because it
reads their initial values from attributes only built-in ops can attach: build symbols with
``fusedres.ops.conv1d_bn_relu_symbol``, which declares them with their initializers.)
Parameter names follow MXNet's Convolution and BatchNorm (kernel, stride, pad, dilate,
num_filter, num_group, no_bias, eps, momentum, use_global_stats); ``relu=False`` leaves
out the relu (conv + batchnorm alone).
"""
import mxnet as mx
import numpy as np

from ..reference import conv1d_out_width
from ._common import (Target, backend_for, check_dtypes, check_no_zero_size, mx_dtype,
                      parse_bool, parse_float, parse_int, record_error)

OP_NAME = "fusedres_conv1d_bn_relu"


def _shape_str(shape):
    return str(tuple(shape))


def _known(shape):
    # MXNet marks unknown shapes as [] and unknown dimensions as -1 (0 in legacy mode).
    return bool(shape) and all(d > 0 for d in shape)


class Conv1dBNReLU(mx.operator.CustomOp):
    def __init__(self, prop, ctx):
        super().__init__()
        self.p = prop
        self.backend = backend_for(ctx)
        self.saved = None  # (z, mean, invstd, batch_stats) from a training forward

    def _conv_args(self):
        p = self.p
        return dict(stride=p.stride, pad=p.pad, dilation=p.dilate, groups=p.num_group,
                    relu=p.relu)

    def _inputs(self, in_data):
        v = self.backend.view
        x, w = v(in_data[0]), v(in_data[1])
        bias = None if self.p.no_bias else v(in_data[2])
        gamma, beta = (v(a) for a in in_data[-2:])
        return x, w, bias, gamma, beta

    def _forward_train(self, x, w, bias, gamma, beta, rm, rv, out, batch_stats):
        be, p = self.backend, self.p
        cout = w.shape[0]
        z = be.empty(out.shape, x.dtype)
        mean, invstd = be.empty((cout,), gamma.dtype), be.empty((cout,), gamma.dtype)
        be.kernels.conv1d_bn_relu_forward_train(
            x, w, bias, gamma, beta, rm, rv, z, mean, invstd, out, eps=p.eps,
            momentum=p.momentum, use_batch_stats=batch_stats, update_running=batch_stats,
            **self._conv_args())
        self.saved = (z, mean, invstd, batch_stats)

    def forward(self, is_train, req, in_data, out_data, aux):
        with self.backend.scope():
            self._forward(is_train, req, in_data, out_data, aux)

    def _forward(self, is_train, req, in_data, out_data, aux):
        be, p = self.backend, self.p
        x, w, bias, gamma, beta = self._inputs(in_data)
        rm, rv = be.view_out(aux[0]), be.view_out(aux[1])
        out = Target(be, req[0], out_data[0])
        self.saved = None
        if out.req == "null":
            return
        if is_train:
            self._forward_train(x, w, bias, gamma, beta, rm, rv, out.buf,
                                batch_stats=not p.use_global_stats)
        else:
            # Inference: batchnorm folded into the conv, one pass, nothing kept.
            be.kernels.conv1d_bn_relu_forward_infer(x, w, bias, gamma, beta, rm, rv, out.buf,
                                                    eps=p.eps, **self._conv_args())
        out.commit()

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        with self.backend.scope():
            self._backward(req, out_grad, in_data, in_grad, aux)

    def _backward(self, req, out_grad, in_data, in_grad, aux):
        be, p = self.backend, self.p
        x, w, bias, gamma, beta = self._inputs(in_data)
        if self.saved is None:
            # Backward after an inference-mode forward (recorded with train_mode=False):
            # gradients are those of the function that forward computed, i.e. at the running
            # statistics. (Stock BatchNorm, given backward(train_mode=True) here, mixes the
            # batch-statistics formula with running statistics; we do not copy that.)
            scratch = be.empty(out_grad[0].shape, x.dtype)
            self._forward_train(x, w, bias, gamma, beta, be.view(aux[0]), be.view(aux[1]),
                                scratch, batch_stats=False)
        z, mean, invstd, batch_stats = self.saved
        names = ["data", "weight"] + ([] if p.no_bias else ["bias"]) + ["gamma", "beta"]
        targets = dict((n, Target(be, r, g)) for n, r, g in zip(names, req, in_grad))
        buf = {n: t.buf for n, t in targets.items()}
        be.kernels.conv1d_bn_relu_backward(
            be.view(out_grad[0]), x, w, z, gamma, beta, mean, invstd,
            buf["data"], buf["weight"], buf.get("bias"), buf["gamma"], buf["beta"],
            batch_stats=batch_stats, **self._conv_args())
        for t in targets.values():
            t.commit()
        # self.saved stays: a second backward (retain_graph=True) needs it again; it goes
        # with this op instance when MXNet drops the recorded graph.


@mx.operator.register(OP_NAME)
class Conv1dBNReLUProp(mx.operator.CustomOpProp):
    def __init__(self, num_filter, kernel, stride="1", pad="0", dilate="1", num_group="1",
                 no_bias="False", eps="1e-5", momentum="0.9", use_global_stats="False",
                 relu="True"):
        super().__init__(need_top_grad=True)
        self.no_bias = parse_bool(no_bias)
        self.use_global_stats = parse_bool(use_global_stats)
        self.relu = parse_bool(relu)
        # An exception raised here would escape MXNet's creator callback and crash the
        # process, so a bad hyper-parameter is kept and raised from infer_shape instead.
        self.error = None
        try:
            self.num_filter = parse_int(num_filter, "num_filter", 1)
            self.kernel = parse_int(kernel, "kernel", 1)
            self.stride = parse_int(stride, "stride", 1)
            self.pad = parse_int(pad, "pad", 0)
            self.dilate = parse_int(dilate, "dilate", 1)
            self.num_group = parse_int(num_group, "num_group", 1)
            self.eps = parse_float(eps, "eps")
            # MXNet's BatchNorm holds momentum as a C float (0.9 -> 0.8999999762); rounding
            # the same way makes the running statistics match the stock blocks bit for bit.
            self.momentum = float(np.float32(parse_float(momentum, "momentum")))
            if self.eps <= 0:
                raise ValueError(f"eps must be > 0, got {self.eps}")
            if self.num_filter % self.num_group:
                raise ValueError(
                    f"num_group ({self.num_group}) must divide num_filter ({self.num_filter})")
        except (ValueError, TypeError) as err:
            self.error = err

    def _raise_if_invalid(self):
        if self.error is not None:
            raise record_error(self.error)

    def list_arguments(self):
        return ["data", "weight"] + ([] if self.no_bias else ["bias"]) + ["gamma", "beta"]

    def list_outputs(self):
        return ["output"]

    def list_auxiliary_states(self):
        return ["running_mean", "running_var"]

    def infer_shape(self, in_shape):
        self._raise_if_invalid()
        data = list(in_shape[0])
        check_no_zero_size("data", data)
        if not _known(data):
            # Nothing to infer from yet (partial inference): leave every shape unknown.
            return (list(in_shape), [[]], [[], []])
        if len(data) != 3:
            raise record_error(ValueError(
                f"data must be 3-D (batch, channels, width), got shape {_shape_str(data)}"))
        n, c, width = data
        if c % self.num_group:
            raise record_error(ValueError(
                f"num_group ({self.num_group}) must divide data's channels ({c})"))
        extent = self.dilate * (self.kernel - 1) + 1
        if width + 2 * self.pad < extent:
            raise record_error(ValueError(
                f"kernel (dilated extent {extent}) is larger than the padded width "
                f"({width} + 2*{self.pad}) of data"))
        weight = [self.num_filter, c // self.num_group, self.kernel]
        given = list(in_shape[1])
        if _known(given) and given != weight:
            raise record_error(ValueError(
                f"weight must have shape {_shape_str(weight)} for data of shape "
                f"{_shape_str(data)}, got {_shape_str(given)}"))
        channel = [self.num_filter]
        for name, shape in zip(self.list_arguments()[2:], in_shape[2:]):
            if _known(shape) and list(shape) != channel:
                raise record_error(ValueError(
                    f"{name} must have shape {_shape_str(channel)}, got {_shape_str(shape)}"))
        out = [n, self.num_filter,
               conv1d_out_width(width, self.kernel, self.stride, self.pad, self.dilate)]
        n_channel_args = len(self.list_arguments()) - 2
        return ([data, weight] + [channel] * n_channel_args, [out], [channel, channel])

    def infer_type(self, in_type):
        self._raise_if_invalid()
        names = self.list_arguments()
        n_conv = len(names) - 2  # data, weight[, bias]; then gamma, beta
        dt = check_dtypes(names[:n_conv], in_type[:n_conv],
                          allowed=(np.float32, np.float64, np.float16))
        if dt is np.float16:
            # As Gluon keeps BatchNorm under cast('float16'): gamma, beta and the running
            # statistics float32 by default (float16 accepted too), float32 statistics inside.
            pt = check_dtypes(names[n_conv:], in_type[n_conv:],
                              allowed=(np.float32, np.float16))
        else:
            pt = check_dtypes(names, in_type, allowed=(np.float32, np.float64))
        return [dt] * n_conv + [pt] * 2, [dt], [pt, pt]

    def declare_backward_dependency(self, out_grad, in_data, out_data):
        # The kernel needs out_grad and the inputs (the forward keeps the conv output), but
        # MXNet 1.9.1 hands backward every array; in a hybridized graph an undeclared one
        # arrives as an empty handle (storage type -1) that operator.py cannot wrap, and
        # backward fails. So the output is declared too: it only stays alive a little longer.
        return [out_grad[0]] + list(in_data) + list(out_data)

    def create_operator(self, ctx, in_shapes, in_dtypes):
        self._raise_if_invalid()
        dt = mx_dtype(in_dtypes[0])
        if ctx.device_type != "gpu" and dt == np.float16:
            raise record_error(TypeError(
                "data must be float32 or float64 on the CPU, got float16"))
        return Conv1dBNReLU(self, ctx)
