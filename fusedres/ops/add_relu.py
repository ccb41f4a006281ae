"""CustomOp ``fusedres_add_relu``: relu(lhs + rhs) in one pass, for residual joins."""
import mxnet as mx
import numpy as np

from ..attrs import check_dtypes
from .backends import Target, backend_for, check_data_dtype, mx_dtype
from .errors import record_error

OP_NAME = "fusedres_add_relu"


class AddReLUCustomOp(mx.operator.CustomOp):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, is_train, req, in_data, out_data, aux):
        be = self.backend
        if req[0] == "null":
            return
        with be.scope():
            out = Target(be, req[0], out_data[0])
            be.kernels.add_relu_forward(be.view(in_data[0]), be.view(in_data[1]), out.buf)
            out.commit()

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        be = self.backend
        with be.scope():
            da, db = Target(be, req[0], in_grad[0]), Target(be, req[1], in_grad[1])
            be.kernels.add_relu_backward(be.view(out_grad[0]), be.view(out_data[0]), da.buf,
                                         db.buf)
            da.commit()
            db.commit()


@mx.operator.register(OP_NAME)
class AddReLUCustomOpProp(mx.operator.CustomOpProp):
    def __init__(self):
        super().__init__(need_top_grad=True)

    def list_arguments(self):
        return ["lhs", "rhs"]

    def list_outputs(self):
        return ["output"]

    def infer_shape(self, in_shape):
        lhs, rhs = list(in_shape[0]), list(in_shape[1])
        for name, shape in (("lhs", lhs), ("rhs", rhs)):
            # Under numpy shape semantics 0 is a real (empty) dimension.
            if mx.util.is_np_shape() and 0 in shape:
                raise record_error(ValueError(
                    f"{name} must have no zero-size dimension, got shape {tuple(shape)}"))
        if lhs and rhs and lhs != rhs:
            raise record_error(ValueError(
                f"rhs must have the same shape as lhs {tuple(lhs)}, got {tuple(rhs)} "
                "(add_relu does not broadcast)"))
        shape = lhs or rhs
        return [shape, shape], [shape], []

    def infer_type(self, in_type):
        try:
            dt = check_dtypes(["lhs", "rhs"], in_type,
                              allowed=(np.float32, np.float64, np.float16))
        except TypeError as err:
            raise record_error(err) from None
        return [dt, dt], [dt], []

    def declare_backward_dependency(self, out_grad, in_data, out_data):
        # Only out_grad and the output are read; the inputs are declared because MXNet 1.9.1
        # passes every array to backward and cannot wrap undeclared ones in hybridized graphs
        # (see conv1d_bn_relu.py).
        return [out_grad[0]] + list(in_data) + [out_data[0]]

    def create_operator(self, ctx, in_shapes, in_dtypes):
        backend = backend_for(ctx)
        check_data_dtype(backend, mx_dtype(in_dtypes[0]), "lhs")
        return AddReLUCustomOp(backend)
