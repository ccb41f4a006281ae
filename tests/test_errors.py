"""Bad input gets a clear error that names the argument: at the op, the block and the kernel."""
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from conftest import conv_with_ones

import fusedres
from fusedres import _C
from fusedres.nn import AddReLU, ConvBNReLU1D
from fusedres.ops.backends import backend_for


def _conv(data, **kw):
    return conv_with_ones(fusedres.conv1d_bn_relu, data, **kw)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4, 5)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"data must be 3-D"):
        _conv(mx.nd.ones(shape))
    with pytest.raises(ValueError, match=r"data must be 3-D"):
        blk = ConvBNReLU1D(4, 3)
        blk.initialize()
        blk(mx.nd.ones(shape))


def test_channel_mismatch_between_data_and_weight():
    x = mx.nd.ones((2, 3, 10))
    w = mx.nd.ones((4, 5, 3))
    one = mx.nd.ones((4,))
    with pytest.raises(ValueError, match=r"weight must have shape \(4, 3, 3\).*got \(4, 5, 3\)"):
        fusedres.conv1d_bn_relu(x, w, one, one, one, one, one, kernel=3, num_filter=4)
    blk = ConvBNReLU1D(4, 3, in_channels=5)
    blk.initialize()
    with pytest.raises(ValueError, match=r"weight must have shape"):
        blk(x)


def test_channel_vector_mismatch():
    x = mx.nd.ones((2, 3, 10))
    w, one, bad = mx.nd.ones((4, 3, 3)), mx.nd.ones((4,)), mx.nd.ones((5,))
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\), got \(5,\)"):
        fusedres.conv1d_bn_relu(x, w, one, bad, one, one, one, kernel=3, num_filter=4)


def test_groups_not_dividing_channels():
    with pytest.raises(ValueError, match=r"num_group \(2\) must divide data's channels \(3\)"):
        _conv(mx.nd.ones((2, 3, 10)), num_group=2)
    with pytest.raises(ValueError, match=r"groups \(3\) must divide channels \(4\)"):
        ConvBNReLU1D(4, 3, groups=3)
    with pytest.raises(ValueError, match=r"groups \(2\) must divide in_channels \(3\)"):
        ConvBNReLU1D(4, 3, groups=2, in_channels=3)


def test_kernel_larger_than_padded_width():
    with pytest.raises(ValueError, match=r"kernel \(dilated extent 5\) is larger than the "
                                         r"padded width"):
        _conv(mx.nd.ones((2, 3, 4)), kernel=5)
    with pytest.raises(ValueError, match=r"dilated extent 7"):
        _conv(mx.nd.ones((2, 3, 6)), kernel=4, dilate=2, pad=0)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"stride must be >= 1"):
        _conv(mx.nd.ones((2, 3, 10)), stride=0)
    with pytest.raises(ValueError, match=r"eps must be > 0"):
        _conv(mx.nd.ones((2, 3, 10)), eps=0)
    with pytest.raises(ValueError, match=r"strides must be >= 1"):
        ConvBNReLU1D(4, 3, strides=0)
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a 1-tuple"):
        ConvBNReLU1D(4, (3, 3))
    with pytest.raises(ValueError, match=r"layout must be 'NCW'"):
        ConvBNReLU1D(4, 3, layout="NWC")


def test_zero_size_dimensions():
    with mx.util.np_shape(True):
        with pytest.raises(ValueError, match=r"data must have no zero-size dimension"):
            _conv(mx.nd.ones((0, 3, 10)))
        with pytest.raises(ValueError, match=r"lhs must have no zero-size dimension"):
            fusedres.add_relu(mx.nd.ones((2, 0)), mx.nd.ones((2, 0)))


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8"])
def test_integer_dtypes(dtype):
    with pytest.raises(TypeError, match=r"data must be float32 or float64 or float16, got "
                                        + dtype):
        _conv(mx.nd.ones((2, 3, 10), dtype=dtype))
    with pytest.raises(TypeError, match=r"lhs must be float32 or float64 or float16"):
        fusedres.add_relu(mx.nd.ones((3,), dtype=dtype), mx.nd.ones((3,), dtype=dtype))


def test_float16_on_cpu_is_refused():
    with pytest.raises(TypeError, match=r"data must be float32 or float64 on the CPU"):
        _conv(mx.nd.ones((2, 3, 10), dtype="float16"))
    with pytest.raises(TypeError, match=r"lhs must be float32 or float64 on the CPU"):
        fusedres.add_relu(mx.nd.ones((3,), dtype="float16"), mx.nd.ones((3,), dtype="float16"))


def test_mixed_dtypes():
    x = mx.nd.ones((2, 3, 10), dtype="float64")
    w, one = mx.nd.ones((4, 3, 3)), mx.nd.ones((4,), dtype="float64")
    with pytest.raises(TypeError, match=r"weight must have the same dtype as data \(float64\)"):
        fusedres.conv1d_bn_relu(x, w, one, one, one, one, one, kernel=3, num_filter=4)


def test_add_relu_mismatched_shapes():
    with pytest.raises(ValueError, match=r"rhs must have the same shape as lhs \(2, 3\), got "
                                         r"\(3, 2\)"):
        fusedres.add_relu(mx.nd.ones((2, 3)), mx.nd.ones((3, 2)))
    with pytest.raises(ValueError, match=r"does not broadcast"):
        AddReLU()(mx.nd.ones((2, 3)), mx.nd.ones((1, 3)))


def test_wrong_device_without_cuda_kernels():
    from fusedres import cuda
    ok, _ = cuda.available()
    if ok:
        pytest.skip("a GPU is present here: the CUDA backend is available")
    with pytest.raises(ValueError, match=r"data is on gpu\(0\) but fusedres's CUDA kernels are "
                                         r"unavailable"):
        backend_for(mx.gpu(0))


def test_symbol_bind_fails_at_shape_inference():
    sym = fusedres.conv1d_bn_relu(*(mx.sym.var(n) for n in
                                    ["data", "w", "b", "g", "be", "rm", "rv"]),
                                  kernel=9, num_filter=4)
    with pytest.raises(mx.base.MXNetError):
        sym.infer_shape(data=(2, 3, 5))


def test_kernel_level_checks_name_the_argument():
    x = np.ones((2, 3, 10), np.float32)
    w = np.ones((4, 3, 3), np.float32)
    c = np.ones(4, np.float32)
    y = np.empty((2, 4, 8), np.float32)
    args = dict(stride=1, pad=0, dilation=1, groups=1, eps=1e-5)
    with pytest.raises(ValueError, match=r"out must have shape|output must have shape"):
        _C.conv1d_bn_relu_forward_infer(x, w, None, c, c, c, c, np.empty((2, 4, 9), np.float32),
                                        **args)
    with pytest.raises(ValueError, match=r"data must be C-contiguous"):
        _C.conv1d_bn_relu_forward_infer(np.ones((2, 10, 3), np.float32).transpose(0, 2, 1), w,
                                        None, c, c, c, c, y, **args)
    with pytest.raises(TypeError, match=r"weight must have the same dtype as data"):
        _C.conv1d_bn_relu_forward_infer(x, w.astype(np.float64), None, c, c, c, c, y, **args)
    with pytest.raises(TypeError, match=r"data must be float32 or float64"):
        _C.conv1d_bn_relu_forward_infer(x.astype(np.int32), w, None, c, c, c, c, y, **args)
    with pytest.raises(ValueError, match=r"data must have no zero-size dimension"):
        _C.conv1d_bn_relu_forward_infer(np.ones((0, 3, 10), np.float32), w, None, c, c, c, c,
                                        np.empty((0, 4, 8), np.float32), **args)
    with pytest.raises(ValueError, match=r"rhs must have the same shape"):
        _C.add_relu_forward(np.ones(3), np.ones(4), np.ones(3))
    with pytest.raises(ValueError, match=r"output must be writable"):
        ro = np.ones(3)
        ro.setflags(write=False)
        _C.add_relu_forward(np.ones(3), np.ones(3), ro)


def test_import_without_mxnet_says_what_to_install(tmp_path):
    # A module named mxnet that fails to import stands in for a missing MXNet.
    (tmp_path / "mxnet.py").write_text("raise ImportError('No module named mxnet')\n")
    proc = subprocess.run([sys.executable, "-c", "import fusedres"], capture_output=True,
                          text=True, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin"})
    assert proc.returncode != 0
    assert "pip install fusedres[cpu]" in proc.stderr and "mxnet-cu112" in proc.stderr
