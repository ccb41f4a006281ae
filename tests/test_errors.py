"""Bad input gets a clear error that names the argument: at the op (both implementations: the
`impl` fixture), the block and the kernel; never an abort."""
import functools
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from helpers import conv_with_ones

import fusedres
from fusedres import _C
from fusedres.nn import AddReLU, ConvBNReLU1D
from fusedres.ops.backends import backend_for


def _conv(impl, data, **kw):
    return conv_with_ones(functools.partial(fusedres.conv1d_bn_relu, use_native=impl), data, **kw)


def _add(impl, a, b):
    return fusedres.add_relu(a, b, use_native=impl)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4, 5)])
def test_wrong_rank(shape, impl):
    with pytest.raises(ValueError, match=r"data must be 3-D"):
        _conv(impl, mx.nd.ones(shape))
    with pytest.raises(ValueError, match=r"data must be 3-D"):
        blk = ConvBNReLU1D(4, 3, use_native=impl)
        blk.initialize()
        blk(mx.nd.ones(shape))


def test_channel_mismatch_between_data_and_weight(impl):
    x = mx.nd.ones((2, 3, 10))
    w = mx.nd.ones((4, 5, 3))
    one = mx.nd.ones((4,))
    with pytest.raises(ValueError, match=r"weight must have shape \(4, 3, 3\).*got \(4, 5, 3\)"):
        fusedres.conv1d_bn_relu(x, w, one, one, one, one, one, kernel=3, num_filter=4,
                                use_native=impl)
    blk = ConvBNReLU1D(4, 3, in_channels=5, use_native=impl)
    blk.initialize()
    with pytest.raises(ValueError, match=r"weight must have shape"):
        blk(x)


def test_channel_vector_mismatch(impl):
    x = mx.nd.ones((2, 3, 10))
    w, one, bad = mx.nd.ones((4, 3, 3)), mx.nd.ones((4,)), mx.nd.ones((5,))
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\), got \(5,\)"):
        fusedres.conv1d_bn_relu(x, w, one, bad, one, one, one, kernel=3, num_filter=4,
                                use_native=impl)


def test_groups_not_dividing_channels(impl):
    with pytest.raises(ValueError, match=r"num_group \(2\) must divide data's channels \(3\)"):
        _conv(impl, mx.nd.ones((2, 3, 10)), num_group=2)
    with pytest.raises(ValueError, match=r"groups \(3\) must divide channels \(4\)"):
        ConvBNReLU1D(4, 3, groups=3)
    with pytest.raises(ValueError, match=r"groups \(2\) must divide in_channels \(3\)"):
        ConvBNReLU1D(4, 3, groups=2, in_channels=3)


def test_kernel_larger_than_padded_width(impl):
    with pytest.raises(ValueError, match=r"kernel \(dilated extent 5\) is larger than the "
                                         r"padded width"):
        _conv(impl, mx.nd.ones((2, 3, 4)), kernel=5)
    with pytest.raises(ValueError, match=r"dilated extent 7"):
        _conv(impl, mx.nd.ones((2, 3, 6)), kernel=4, dilate=2, pad=0)


def test_bad_hyperparameters(impl):
    with pytest.raises(ValueError, match=r"stride must be >= 1"):
        _conv(impl, mx.nd.ones((2, 3, 10)), stride=0)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0"):
        _conv(impl, mx.nd.ones((2, 3, 10)), eps=0)
    with pytest.raises(ValueError, match=r"strides must be >= 1"):
        ConvBNReLU1D(4, 3, strides=0)
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a 1-tuple"):
        ConvBNReLU1D(4, (3, 3))
    with pytest.raises(ValueError, match=r"layout must be 'NCW'"):
        ConvBNReLU1D(4, 3, layout="NWC")


def test_zero_size_dimensions(impl):
    with mx.util.np_shape(True):
        with pytest.raises(ValueError, match=r"data must have no zero-size dimension"):
            _conv(impl, mx.nd.ones((0, 3, 10)))
        with pytest.raises(ValueError, match=r"lhs must have no zero-size dimension"):
            _add(impl, mx.nd.ones((2, 0)), mx.nd.ones((2, 0)))


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8"])
def test_integer_dtypes(dtype, impl):
    with pytest.raises(TypeError, match=r"data must be float32 or float64.*, got " + dtype):
        _conv(impl, mx.nd.ones((2, 3, 10), dtype=dtype))
    with pytest.raises(TypeError, match=r"lhs must be float32 or float64.*, got " + dtype):
        _add(impl, mx.nd.ones((3,), dtype=dtype), mx.nd.ones((3,), dtype=dtype))


def test_float16_on_cpu_is_refused(impl):
    with pytest.raises(TypeError, match=r"data must be float32 or float64 on the CPU"):
        _conv(impl, mx.nd.ones((2, 3, 10), dtype="float16"))
    with pytest.raises(TypeError, match=r"lhs must be float32 or float64 on the CPU"):
        _add(impl, mx.nd.ones((3,), dtype="float16"), mx.nd.ones((3,), dtype="float16"))


def test_mixed_dtypes(impl):
    x = mx.nd.ones((2, 3, 10), dtype="float64")
    w, one = mx.nd.ones((4, 3, 3)), mx.nd.ones((4,), dtype="float64")
    with pytest.raises(TypeError, match=r"weight must have the same dtype as data \(float64\)"):
        fusedres.conv1d_bn_relu(x, w, one, one, one, one, one, kernel=3, num_filter=4,
                                use_native=impl)


def test_add_relu_mismatched_shapes(impl):
    with pytest.raises(ValueError, match=r"rhs must have the same shape as lhs \(2, 3\), got "
                                         r"\(3, 2\)"):
        _add(impl, mx.nd.ones((2, 3)), mx.nd.ones((3, 2)))
    with pytest.raises(ValueError, match=r"does not broadcast"):
        AddReLU(use_native=impl)(mx.nd.ones((2, 3)), mx.nd.ones((1, 3)))


def test_wrong_device_without_cuda_kernels():
    from fusedres import cuda
    ok, _ = cuda.available()
    if ok:
        pytest.skip("a GPU is present here: the CUDA backend is available")
    with pytest.raises(ValueError, match=r"data is on gpu\(0\) but fusedres's CUDA kernels are "
                                         r"unavailable"):
        backend_for(mx.gpu(0))


def test_symbol_bind_fails_at_shape_inference(impl):
    sym = fusedres.conv1d_bn_relu(*(mx.sym.var(n) for n in
                                    ["data", "w", "b", "g", "be", "rm", "rv"]),
                                  kernel=9, num_filter=4, use_native=impl)
    with pytest.raises(mx.base.MXNetError):
        sym.infer_shape(data=(2, 3, 5))


def test_kernel_level_checks_name_the_argument():
    x = np.ones((2, 3, 10), np.float32)
    w = np.ones((4, 3, 3), np.float32)
    c = np.ones(4, np.float32)
    y = np.empty((2, 4, 8), np.float32)
    args = dict(stride=1, pad=0, dilate=1, num_group=1, eps=1e-5)
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


# ---------------------------------------------------------------- limits (issue: aborts)
@pytest.mark.parametrize("stride", [2**27, 2**31 - 1])
def test_huge_strides_compute_what_the_reference_computes(stride, impl):
    """Stock MXNet accepts any int stride; the kernels' phase buffers once grew with it and
    aborted the process (now a stride beyond the kernel gathers the windows instead)."""
    from fusedres import reference as R
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 10)), rng.standard_normal((4, 3, 3))
    c = np.ones(4)
    with mx.autograd.record(train_mode=False):
        y = fusedres.conv1d_bn_relu(mx.nd.array(x, dtype="float64"),
                                    mx.nd.array(w, dtype="float64"), *(mx.nd.array(
                                        v, dtype="float64") for v in (c * 0, c, c * 0, c * 0, c)),
                                    kernel=3, num_filter=4, stride=stride, use_native=impl)
    ref = R.conv1d_bn_relu_forward(x, w, c * 0, c, c * 0, c * 0, c, stride=stride,
                                   is_train=False)[0]
    assert y.shape == ref.shape == (2, 4, 1)
    np.testing.assert_allclose(y.asnumpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw, message", [
    (dict(stride=2**31), r"stride must be <= 2147483647, got 2147483648"),
    (dict(pad=2**31), r"pad must be <= 2147483647, got 2147483648"),
    (dict(pad=2**40), r"pad must be <= 2147483647"),
    (dict(dilate=2**33), r"dilate must be <= 2147483647"),
    (dict(pad=2**30), r"pad \(1073741824\) and stride \(1\) give an output of .* elements, "
                      r"more than 2147483647"),
    (dict(dilate=2**30, kernel=3), r"kernel \(dilated extent 2147483649\) is larger than the "
                                   r"padded width"),
    (dict(momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
    (dict(momentum=-0.1), r"momentum must be in \[0, 1\], got -0.1"),
    (dict(momentum=float("nan")), r"momentum must be in \[0, 1\], got nan"),
    (dict(eps=float("nan")), r"eps must be a finite number > 0, got nan"),
    (dict(eps=float("inf")), r"eps must be a finite number > 0, got inf"),
    (dict(eps=-1.0), r"eps must be a finite number > 0, got -1"),
])
def test_out_of_range_attributes_are_named(kw, message, impl):
    with pytest.raises(ValueError, match=message):
        _conv(impl, mx.nd.ones((2, 3, 10)), **kw).wait_to_read()


@pytest.mark.parametrize("kw, message", [
    (dict(strides=2**31), r"strides must be <= 2147483647"),
    (dict(padding=2**40), r"padding must be <= 2147483647"),
    (dict(momentum=1.5), r"momentum must be in \[0, 1\]"),
    (dict(epsilon=float("nan")), r"epsilon must be a finite number > 0"),
    (dict(dilation=0), r"dilation must be >= 1"),
])
def test_out_of_range_block_arguments_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        ConvBNReLU1D(4, 3, **kw)


def test_huge_padding_in_a_block_names_padding(impl):
    blk = ConvBNReLU1D(4, 3, padding=2**30, use_native=impl)
    blk.initialize()
    with pytest.raises(ValueError, match=r"pad \(1073741824\) and stride \(1\) give an output"):
        blk(mx.nd.ones((2, 3, 10))).wait_to_read()


def test_symbols_and_ndarrays_do_not_mix(impl):
    s, a = mx.sym.var("s"), mx.nd.ones((2, 3))
    with pytest.raises(TypeError, match=r"rhs must be a Symbol like lhs, got NDArray"):
        fusedres.add_relu(s, a, use_native=impl)
    with pytest.raises(TypeError, match=r"rhs must be an NDArray like lhs, got Symbol"):
        fusedres.add_relu(a, s, use_native=impl)
    one = mx.nd.ones((4,))
    with pytest.raises(TypeError, match=r"weight must be an NDArray like data, got Symbol"):
        fusedres.conv1d_bn_relu(mx.nd.ones((2, 3, 10)), mx.sym.var("w"), one, one, one, one,
                                one, kernel=3, num_filter=4, use_native=impl)
    with pytest.raises(TypeError, match=r"lhs must be an NDArray or a Symbol, got list"):
        fusedres.add_relu([1.0], a, use_native=impl)


@pytest.mark.parametrize("shape", [(0, 3, 10), (2, 3, 0)])
@pytest.mark.parametrize("hybridize", [False, True])
def test_zero_size_batch_or_width_is_named(shape, hybridize, impl):
    """Zero-size arrays exist under numpy shape semantics (MXNet's legacy mode cannot make
    them); a zero dimension must be named, by the forms and by the blocks."""
    with mx.util.np_shape(True):
        with pytest.raises(ValueError, match=r"data must have no zero-size dimension"):
            _conv(impl, mx.nd.ones(shape)).wait_to_read()
        blk = ConvBNReLU1D(4, 3, in_channels=3, use_native=impl)
        blk.initialize()
        if hybridize:
            blk.hybridize()
        with pytest.raises(ValueError, match=r"data must have no zero-size dimension"):
            blk(mx.nd.ones(shape)).wait_to_read()
        with pytest.raises(ValueError, match=r"lhs must have no zero-size dimension"):
            AddReLU(use_native=impl)(mx.nd.ones(shape), mx.nd.ones(shape)).wait_to_read()
