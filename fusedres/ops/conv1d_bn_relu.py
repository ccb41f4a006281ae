"""CustomOp ``fusedres_conv1d_bn_relu``: relu(batchnorm(conv1d(data))) in one op.

Arguments: data (N, C, W), weight (num_filter, C / num_group, kernel), bias (num_filter,)
unless no_bias, gamma, beta (num_filter,). Auxiliary states: running_mean, running_var.
Attributes: those of ``fusedres.attrs.ConvAttrs``. (MXNet's Initializer cannot set up
auxiliary states that ``mx.sym.Custom`` creates, because it reads their initial values from
attributes only built-in ops can attach: build symbols with
``fusedres.ops.conv1d_bn_relu_symbol``, which declares them with their initializers.)
"""
import mxnet as mx
import numpy as np

from ..attrs import ConvAttrs, check_dtypes
from .backends import Target, backend_for, check_data_dtype, mx_dtype
from .errors import record_error

OP_NAME = "fusedres_conv1d_bn_relu"


def _shape_str(shape):
    return str(tuple(shape))


def _known(shape):
    # MXNet marks unknown shapes as [] and unknown dimensions as -1 (0 in legacy mode).
    return bool(shape) and all(d > 0 for d in shape)


class ConvBNReLUCustomOp(mx.operator.CustomOp):
    def __init__(self, prop, backend):
        super().__init__()
        self.p = prop
        self.backend = backend
        self.saved = None  # (z, mean, invstd, batch_stats) from a training forward

    def _conv_args(self):
        return self.p.attrs.kernel_kwargs()

    def _inputs(self, in_data):
        v = self.backend.view
        x, w = v(in_data[0]), v(in_data[1])
        bias = None if self.p.attrs.no_bias else v(in_data[2])
        gamma, beta = (v(a) for a in in_data[-2:])
        return x, w, bias, gamma, beta

    def _forward_train(self, x, w, bias, gamma, beta, rm, rv, out, batch_stats):
        be, a = self.backend, self.p.attrs
        cout = w.shape[0]
        z = be.empty(out.shape, x.dtype)
        mean, invstd = be.empty((cout,), gamma.dtype), be.empty((cout,), gamma.dtype)
        be.kernels.conv1d_bn_relu_forward_train(
            x, w, bias, gamma, beta, rm, rv, z, mean, invstd, out, eps=a.eps,
            momentum=a.momentum, batch_stats=batch_stats,
            **self._conv_args())
        self.saved = (z, mean, invstd, batch_stats)

    def forward(self, is_train, req, in_data, out_data, aux):
        with self.backend.scope():
            self._forward(is_train, req, in_data, out_data, aux)

    def _forward(self, is_train, req, in_data, out_data, aux):
        be, a = self.backend, self.p.attrs
        x, w, bias, gamma, beta = self._inputs(in_data)
        rm, rv = be.view_out(aux[0]), be.view_out(aux[1])
        out = Target(be, req[0], out_data[0])
        self.saved = None
        if out.req == "null":
            return
        if is_train:
            self._forward_train(x, w, bias, gamma, beta, rm, rv, out.buf,
                                batch_stats=not a.use_global_stats)
        else:
            # Inference: batchnorm folded into the conv, one pass, nothing kept.
            be.kernels.conv1d_bn_relu_forward_infer(x, w, bias, gamma, beta, rm, rv, out.buf,
                                                    eps=a.eps, **self._conv_args())
        out.commit()

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        with self.backend.scope():
            self._backward(req, out_grad, in_data, in_grad, aux)

    def _backward(self, req, out_grad, in_data, in_grad, aux):
        be = self.backend
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
        names = self.p.list_arguments()
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
class ConvBNReLUCustomOpProp(mx.operator.CustomOpProp):
    def __init__(self, **attrs):
        super().__init__(need_top_grad=True)
        # An exception raised here would escape MXNet's creator callback and crash the
        # process, so bad attributes are kept and raised from infer_shape instead.
        self.error, self.attrs = None, None
        try:
            self.attrs = ConvAttrs.parse(**attrs)
        except (ValueError, TypeError) as err:
            self.error = err
        self.no_bias = self.attrs is not None and self.attrs.no_bias

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
        if not _known(data):
            if mx.util.is_np_shape() and 0 in data:
                # Under numpy shape semantics 0 is a real (empty) dimension.
                raise record_error(ValueError(
                    f"data must have no zero-size dimension, got shape {tuple(data)}"))
            # Nothing to infer from yet (partial inference): leave every shape unknown.
            return (list(in_shape), [[]], [[], []])
        a = self.attrs
        given = list(in_shape[1])
        try:
            weight = list(a.check_data(data))
            if _known(given):
                a.check_weight(data, given)
        except ValueError as err:
            raise record_error(err) from None
        channel = [a.num_filter]
        for name, shape in zip(self.list_arguments()[2:], in_shape[2:]):
            if _known(shape) and list(shape) != channel:
                raise record_error(ValueError(
                    f"{name} must have shape {_shape_str(channel)}, got {_shape_str(shape)}"))
        out = [data[0], a.num_filter, a.out_width(data[2])]
        n_channel_args = len(self.list_arguments()) - 2
        return ([data, weight] + [channel] * n_channel_args, [out], [channel, channel])

    def infer_type(self, in_type):
        self._raise_if_invalid()
        names = self.list_arguments()
        n_conv = len(names) - 2  # data, weight[, bias]; then gamma, beta
        try:
            dt = check_dtypes(names[:n_conv], in_type[:n_conv],
                              allowed=(np.float32, np.float64, np.float16))
            if dt is np.float16:
                # As Gluon keeps BatchNorm under cast('float16'): gamma, beta and the running
                # statistics float32 by default (float16 accepted too), float32 statistics
                # inside.
                pt = check_dtypes(names[n_conv:], in_type[n_conv:],
                                  allowed=(np.float32, np.float16))
            else:
                pt = check_dtypes(names, in_type, allowed=(np.float32, np.float64))
        except TypeError as err:
            raise record_error(err) from None
        return [dt] * n_conv + [pt] * 2, [dt], [pt, pt]

    def declare_backward_dependency(self, out_grad, in_data, out_data):
        # The kernel needs out_grad and the inputs (the forward keeps the conv output), but
        # MXNet 1.9.1 hands backward every array; in a hybridized graph an undeclared one
        # arrives as an empty handle (storage type -1) that operator.py cannot wrap, and
        # backward fails. So the output is declared too: it only stays alive a little longer.
        return [out_grad[0]] + list(in_data) + list(out_data)

    def create_operator(self, ctx, in_shapes, in_dtypes):
        self._raise_if_invalid()
        backend = backend_for(ctx)
        check_data_dtype(backend, mx_dtype(in_dtypes[0]), "data")
        return ConvBNReLUCustomOp(self, backend)
