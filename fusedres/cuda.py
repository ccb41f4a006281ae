"""CUDA kernels for fusedres, through CuPy: the only module that imports CuPy.

Kernels live in ``csrc/cuda/*.cu`` (shipped in wheels as ``fusedres/cuda_src/``). At run time
the cubin shipped in ``fusedres/cubins`` (``tools/build_cubins.py``, NVRTC 11.8) for the device's
compute capability is loaded; without one the source is compiled by CuPy's NVRTC and cached.

The functions mirror the CPU binding ``fusedres._C`` on CuPy arrays: same names, arguments and
checks (ValueError/TypeError naming the argument), outputs written in place. Data may be float32
or float16; the per-channel batchnorm arrays (gamma, beta, running and saved statistics) have
the data's dtype or float32, as Gluon keeps them under ``cast('float16')``.

Numbers: NaN and infinities propagate as MXNet's relu and BatchNorm and the numpy reference
give them (relu(NaN) = NaN, gradient dy * relu'(pre) with relu'(NaN) = NaN, BatchNorm computed
as (z - mean) * gamma * invstd + beta, inference included: nothing is folded).

Limits: every hyper-parameter, dimension and tensor size the ops accept (up to 2**31 - 1,
fusedres.ops.attrs.MAX_EXTENT), except that the conv kernels take tensors of at most
2**31 - 2**16 elements, at most 65535 groups and 65535 * 64 channels per group: beyond, a
ValueError names the argument.

Streams: every kernel is launched on CuPy's current stream and nothing here synchronizes.
MXNet 1.9.1 has no stream handshake (DLPack without ``__dlpack__``), so code handing MXNet
arrays to these functions must run them inside ``mxnet_scope(ctx)``, which selects the
NDArray's device and synchronizes the stream before returning control to MXNet.

Importing this module never needs CuPy; CuPy is imported inside the functions.
"""
import contextlib
import os
import threading
from pathlib import Path

import numpy as np

_PKG = Path(__file__).resolve().parent
CUBIN_DIR = _PKG / "cubins"
SOURCE_DIR = _PKG.parent / "csrc" / "cuda"        # a source checkout
if not SOURCE_DIR.is_dir():
    SOURCE_DIR = _PKG / "cuda_src"                 # an installed wheel ships them as package data
NVRTC_OPTIONS = ("-std=c++17", "-DNDEBUG")

# Entry points of each csrc/cuda/<name>.cu, as launched below (tests check the cubins have them).
_DATA = ("f32", "f16")                   # by data dtype
_MIXED = ("f32", "f16", "f16_p32")       # by (data, per-channel) dtypes
KERNELS = {
    "add_relu": tuple(f"add_relu_{d}_{s}" for d in ("forward", "backward") for s in _DATA),
    "conv1d_bn_relu": tuple(
        [f"{k}_{s}" for k in ("conv1d_fwd_train", "conv1d_bwd_data", "conv1d_bwd_weight",
                              "sum_splits", "bn_fwd_finalize", "bn_bwd_finalize")
         for s in _DATA]
        + [f"{k}_{s}" for k in ("conv1d_fwd_infer", "bn_relu_apply", "bn_bwd_reduce",
                                "bn_bwd_dz") for s in _MIXED]),
}

_TILE = 64           # output tile of the conv kernels (BM = BN in conv1d_bn_relu.cu)
_BK = 16             # depth of one shared-memory slice
_THREADS = 256       # threads per block of every kernel launched here
_INT32_MAX = 2**31 - 1   # the ops' MAX_EXTENT: any hyper-parameter, dimension or tensor size
# The conv kernels index with int32 and let a tile's threads compute indices past a tensor's
# end, so each conv tensor stays 2^16 elements below that (csrc/cuda/conv1d_bn_relu.cu).
_CONV_MAX_ELEMENTS = 2**31 - 2**16
_GRID_YZ_MAX = 65535
_MAX_ROWS = _GRID_YZ_MAX * _TILE  # channels per group: their tiles go on the grid's y axis


def available():
    """(True, description) when CuPy can use a CUDA device, else (False, reason). Never raises."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CuPy whose CUDA libraries fail to load
        return False, f"cupy is not importable ({type(e).__name__}: {e})"
    try:
        # Raises CUDARuntimeError (not 0) on a machine without a driver or GPU.
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"no usable CUDA device ({type(e).__name__}: {e})"
    if count < 1:
        return False, "no CUDA device"
    return True, f"{count} CUDA device(s), cupy {cupy.__version__}"


def _cupy():
    import cupy
    return cupy


# ---------------------------------------------------------------------------------------------
# Loading and launching

_lock = threading.Lock()
_modules = {}   # (source name, device id) -> cupy.RawModule
_sm_counts = {}


def _cubin_for(name, major, minor):
    """Shipped cubin that runs on compute capability major.minor: same major, minor <= ours."""
    best = None
    for path in CUBIN_DIR.glob(f"{name}.sm_*.cubin"):
        arch = path.name[len(name) + 4:-len(".cubin")]
        if arch.isdigit() and len(arch) >= 2:
            a_major, a_minor = int(arch[:-1]), int(arch[-1])
            if a_major == major and a_minor <= minor and (best is None or a_minor > best[0]):
                best = (a_minor, path)
    return best[1] if best else None


def _nvrtc_include_dirs():
    dirs = [str(SOURCE_DIR)]
    try:  # headers such as cuda_fp16.h when CUDA comes from pip wheels rather than a toolkit
        import nvidia.cuda_runtime
        dirs += [str(Path(p) / "include") for p in nvidia.cuda_runtime.__path__
                 if (Path(p) / "include").is_dir()]
    except ImportError:
        pass
    return dirs


def _module(name):
    """The RawModule of csrc/cuda/<name>.cu for the current device, loaded once."""
    cp = _cupy()
    dev = cp.cuda.Device()
    key = (name, dev.id)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            cc = dev.compute_capability  # e.g. "86"
            cubin = _cubin_for(name, int(cc[:-1]), int(cc[-1]))
            if cubin is not None and not os.environ.get("FUSEDRES_CUDA_FROM_SOURCE"):
                mod = cp.RawModule(path=str(cubin))
            else:
                src = SOURCE_DIR / f"{name}.cu"
                if not src.is_file():
                    raise RuntimeError(f"no cubin for sm_{cc} in {CUBIN_DIR} and no source "
                                       f"{src} to compile; run tools/build_cubins.py")
                options = NVRTC_OPTIONS + tuple(f"-I{d}" for d in _nvrtc_include_dirs())
                mod = cp.RawModule(code=src.read_text(), options=options)  # CuPy caches on disk
            _modules[key] = mod
        return mod


def _sm_count():
    cp = _cupy()
    dev = cp.cuda.Device()
    if dev.id not in _sm_counts:
        _sm_counts[dev.id] = dev.attributes["MultiProcessorCount"]
    return _sm_counts[dev.id]


def _launch(source, kernel, grid, block, args):
    """Launches kernel of csrc/cuda/<source>.cu on CuPy's current stream.

    grid and block are explicit tuples; scalars in args must already be typed numpy scalars
    (np.int32, np.int64, np.float32, np.float64) matching the kernel's C signature: CuPy would
    pass a Python int or float as 8 bytes whatever the parameter's type.
    """
    for i, a in enumerate(args):
        # np.float64 is a subclass of float: only plain Python numbers lack a C type.
        if isinstance(a, (int, float, bool)) and not isinstance(a, np.generic):
            raise TypeError(f"{kernel}: argument {i} is a Python {type(a).__name__} ({a!r}); "
                            "pass a numpy scalar of the parameter's C type")
    _module(source).get_function(kernel)(tuple(grid), tuple(block), tuple(args))


_NULL = np.uint64(0)  # a null pointer argument


def _ptr(a):
    return _NULL if a is None else a


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Argument checks, mirroring csrc/bindings.cpp

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def _shape_str(shape):
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _check(a, name, max_elements=_INT32_MAX):
    """a must be a C-contiguous float32/float16 CuPy array on the current device."""
    cp = _cupy()
    if not isinstance(a, cp.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(a).__name__}")
    if a.dtype not in _SUFFIX:
        raise TypeError(f"{name} must be float32 or float16, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    dev = cp.cuda.Device().id
    if a.device.id != dev:
        raise ValueError(f"{name} is on GPU {a.device.id} but the current device is GPU {dev}")
    if a.size > max_elements:
        raise ValueError(f"{name} has {a.size} elements; the CUDA kernels take at most "
                         f"{max_elements}")
    return a


def _check_opt(a, name, max_elements=_INT32_MAX):
    return None if a is None else _check(a, name, max_elements)


def _conv_check(a, name):
    return _check(a, name, _CONV_MAX_ELEMENTS)


def _conv_check_opt(a, name):
    return _check_opt(a, name, _CONV_MAX_ELEMENTS)


def _same_dtype(dtype, args, ref_name):
    for a, name in args:
        if a is not None and a.dtype != dtype:
            raise TypeError(f"{name} must have the same dtype as {ref_name}")


def _expect(a, name, shape):
    if a is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {_shape_str(shape)}, got {_shape_str(a.shape)}")


def _require(ok, msg):
    if not ok:
        raise ValueError(msg)


class _ConvShape:
    def __init__(self, x, w, stride, pad, dilation, groups):
        _require(x.ndim == 3, f"data must be 3-D (batch, channels, width), got {_shape_str(x.shape)}")
        _require(w.ndim == 3, "weight must be 3-D (out_channels, in_channels / groups, kernel), "
                              f"got {_shape_str(w.shape)}")
        stride, pad, dilation, groups = int(stride), int(pad), int(dilation), int(groups)
        _require(stride >= 1, f"stride must be >= 1, got {stride}")
        _require(dilation >= 1, f"dilation must be >= 1, got {dilation}")
        _require(pad >= 0, f"pad must be >= 0, got {pad}")
        _require(groups >= 1, f"groups must be >= 1, got {groups}")
        for value, name in ((stride, "stride"), (pad, "pad"), (dilation, "dilation"),
                            (groups, "groups")):
            _require(value <= _INT32_MAX, f"{name} must be <= {_INT32_MAX}, got {value}")
        self.N, self.Cin, self.L = x.shape
        self.Cout, _, self.K = w.shape
        self.stride, self.pad, self.dilation, self.groups = stride, pad, dilation, groups
        _require(self.N > 0 and self.Cin > 0 and self.L > 0,
                 f"data must have no zero-size dimension, got {_shape_str(x.shape)}")
        _require(self.Cout > 0 and self.K > 0,
                 f"weight must have no zero-size dimension, got {_shape_str(w.shape)}")
        _require(self.Cin % groups == 0,
                 f"groups ({groups}) must divide data's channels ({self.Cin})")
        _require(self.Cout % groups == 0,
                 f"groups ({groups}) must divide weight's out_channels ({self.Cout})")
        _require(w.shape[1] == self.Cin // groups,
                 f"weight's in_channels ({w.shape[1]}) must equal data's channels / groups "
                 f"({self.Cin // groups})")
        extent = dilation * (self.K - 1) + 1
        _require(self.L + 2 * pad >= extent, f"kernel (dilated extent {extent}) is larger than "
                                             f"the padded width ({self.L + 2 * pad})")
        _require(groups <= _GRID_YZ_MAX, f"groups must be <= {_GRID_YZ_MAX}, got {groups}")
        self.Lout = (self.L + 2 * pad - extent) // stride + 1
        self.cin_g, self.cout_g = self.Cin // groups, self.Cout // groups
        _require(self.cout_g <= _MAX_ROWS, f"weight's out_channels per group ({self.cout_g}) "
                                           f"must be <= {_MAX_ROWS} for the CUDA kernels")
        _require(self.cin_g <= _MAX_ROWS, f"data's channels per group ({self.cin_g}) must be "
                                          f"<= {_MAX_ROWS} for the CUDA kernels")
        self.M = self.N * self.Lout
        out = self.N * self.Cout * self.Lout
        # Input positions reach L + pad - 1 < 2^32 (both at most 2^31 - 1): the kernels compute
        # them modulo 2^32, which needs nothing more.
        _require(out <= _CONV_MAX_ELEMENTS,
                 f"pad ({pad}) and stride ({stride}) give an output of {self.N} x {self.Cout} x "
                 f"{self.Lout} elements; the CUDA kernels take at most {_CONV_MAX_ELEMENTS}")

    @property
    def out(self):
        return (self.N, self.Cout, self.Lout)

    def args(self):
        return tuple(np.int32(v) for v in (self.N, self.Cin, self.L, self.Cout, self.K, self.Lout,
                                           self.stride, self.pad, self.dilation, self.groups))


def _param_dtype(data, gamma):
    """dtype of the per-channel arrays: gamma's, which must be data's or float32."""
    if gamma.dtype != data.dtype and gamma.dtype != np.float32:
        raise TypeError(f"gamma must have the same dtype as data or be float32, got {gamma.dtype}")
    return gamma.dtype


def _mixed(data_dtype, param_dtype):
    d, p = _SUFFIX[data_dtype], _SUFFIX[param_dtype]
    return d if d == p else f"{d}_p32"


def _channel_splits(per_channel, channels):
    """(splits, chunk) for the per-channel reductions: enough blocks to fill the device."""
    want = _cdiv(4 * _sm_count(), channels)
    splits = max(1, min(want, _cdiv(per_channel, 2048), _GRID_YZ_MAX))
    chunk = _cdiv(per_channel, splits)
    return _cdiv(per_channel, chunk), chunk


# ---------------------------------------------------------------------------------------------
# conv1d_bn_relu

def conv1d_bn_relu_forward_train(data, weight, bias, gamma, beta, running_mean, running_var, z,
                                 mean, invstd, out, stride, pad, dilation, groups, eps, momentum,
                                 use_batch_stats, update_running, relu=True):
    """Conv1d+BN+ReLU forward keeping z (conv output), mean and invstd for backward.

    With use_batch_stats, normalizes with the batch mean and biased variance and, if
    update_running, sets ``running = momentum * running + (1 - momentum) * batch``; otherwise
    normalizes with the running statistics and leaves them alone.
    """
    cp = _cupy()
    x, w = _conv_check(data, "data"), _conv_check(weight, "weight")
    bias = _conv_check_opt(bias, "bias")
    chans = [(_conv_check(a, n), n) for a, n in ((gamma, "gamma"), (beta, "beta"),
                                            (running_mean, "running_mean"),
                                            (running_var, "running_var"), (mean, "saved mean"),
                                            (invstd, "saved invstd"))]
    z, out = _conv_check(z, "saved conv output"), _conv_check(out, "output")
    _same_dtype(x.dtype, [(w, "weight"), (bias, "bias"), (z, "saved conv output"),
                          (out, "output")], "data")
    pdt = _param_dtype(x, gamma)
    _same_dtype(pdt, chans[1:], "gamma")
    s = _ConvShape(x, w, stride, pad, dilation, groups)
    for a, n in [(bias, "bias")] + chans:
        _expect(a, n, (s.Cout,))
    _expect(z, "saved conv output", s.out)
    _expect(out, "output", s.out)
    _require(eps > 0, "eps must be > 0")

    dsuf, psuf = _SUFFIX[x.dtype], _SUFFIX[pdt]
    ntiles = _cdiv(s.M, _TILE)
    if use_batch_stats:
        psum = cp.empty((ntiles, s.Cout), np.float32)
        pm2 = cp.empty((ntiles, s.Cout), np.float32)
    else:
        psum = pm2 = None
    _launch("conv1d_bn_relu", f"conv1d_fwd_train_{dsuf}",
            (ntiles, _cdiv(s.cout_g, _TILE), s.groups), (_THREADS,),
            s.args() + (x, w, _ptr(bias), z, _ptr(psum), _ptr(pm2),
                        np.int32(bool(use_batch_stats))))
    _launch("conv1d_bn_relu", f"bn_fwd_finalize_{psuf}", (s.Cout,), (_THREADS,),
            (_ptr(psum), _ptr(pm2), np.int32(ntiles), np.int32(s.M), np.int32(s.Cout),
             running_mean, running_var, mean, invstd, np.float64(eps), np.float64(momentum),
             np.int32(bool(use_batch_stats)), np.int32(bool(update_running))))
    rows = s.N * s.Cout
    _launch("conv1d_bn_relu", f"bn_relu_apply_{_mixed(x.dtype, pdt)}",
            (min(rows, 32 * _sm_count()),), (_THREADS,),
            (z, gamma, beta, mean, invstd, np.int32(rows), np.int32(s.Cout), np.int32(s.Lout),
             np.int32(bool(relu)), out))


def conv1d_bn_relu_forward_infer(data, weight, bias, gamma, beta, running_mean, running_var, out,
                                 stride, pad, dilation, groups, eps, relu=True):
    """Conv1d+BN+ReLU inference in one pass: BN applied in the conv epilogue, in BatchNorm's
    order with the running statistics."""
    x, w = _conv_check(data, "data"), _conv_check(weight, "weight")
    bias = _conv_check_opt(bias, "bias")
    chans = [(_conv_check(a, n), n) for a, n in ((gamma, "gamma"), (beta, "beta"),
                                            (running_mean, "running_mean"),
                                            (running_var, "running_var"))]
    out = _conv_check(out, "output")
    _same_dtype(x.dtype, [(w, "weight"), (bias, "bias"), (out, "output")], "data")
    pdt = _param_dtype(x, gamma)
    _same_dtype(pdt, chans[1:], "gamma")
    s = _ConvShape(x, w, stride, pad, dilation, groups)
    for a, n in [(bias, "bias")] + chans:
        _expect(a, n, (s.Cout,))
    _expect(out, "output", s.out)
    _require(eps > 0, "eps must be > 0")
    _launch("conv1d_bn_relu", f"conv1d_fwd_infer_{_mixed(x.dtype, pdt)}",
            (_cdiv(s.M, _TILE), _cdiv(s.cout_g, _TILE), s.groups), (_THREADS,),
            s.args() + (x, w, _ptr(bias), gamma, beta, running_mean, running_var,
                        np.float32(eps), np.int32(bool(relu)), out))


def conv1d_bn_relu_backward(out_grad, data, weight, z, gamma, beta, mean, invstd, data_grad,
                            weight_grad, bias_grad, gamma_grad, beta_grad, stride, pad, dilation,
                            groups, batch_stats, relu=True):
    """Conv1d+BN+ReLU backward from what forward_train saved; a None gradient is not computed.

    batch_stats must match the forward: with batch statistics the gradient also flows through
    the mean and variance.
    """
    cp = _cupy()
    dy, x = _conv_check(out_grad, "out_grad"), _conv_check(data, "data")
    w = _conv_check(weight, "weight")
    z = _conv_check(z, "saved conv output")
    chans = [(_conv_check(a, n), n) for a, n in ((gamma, "gamma"), (beta, "beta"),
                                            (mean, "saved mean"), (invstd, "saved invstd"))]
    dx = _conv_check_opt(data_grad, "data_grad")
    dw = _conv_check_opt(weight_grad, "weight_grad")
    dbias = _conv_check_opt(bias_grad, "bias_grad")
    dgamma = _conv_check_opt(gamma_grad, "gamma_grad")
    dbeta = _conv_check_opt(beta_grad, "beta_grad")
    _same_dtype(x.dtype, [(dy, "out_grad"), (w, "weight"), (z, "saved conv output"),
                          (dx, "data_grad"), (dw, "weight_grad"), (dbias, "bias_grad")], "data")
    pdt = _param_dtype(x, gamma)
    _same_dtype(pdt, chans[1:] + [(dgamma, "gamma_grad"), (dbeta, "beta_grad")], "gamma")
    s = _ConvShape(x, w, stride, pad, dilation, groups)
    _expect(dy, "out_grad", s.out)
    _expect(z, "saved conv output", s.out)
    for a, n in chans + [(dbias, "bias_grad"), (dgamma, "gamma_grad"), (dbeta, "beta_grad")]:
        _expect(a, n, (s.Cout,))
    _expect(dx, "data_grad", x.shape)
    _expect(dw, "weight_grad", w.shape)

    dsuf, psuf, msuf = _SUFFIX[x.dtype], _SUFFIX[pdt], _mixed(x.dtype, pdt)
    C, M = s.Cout, s.M
    nsplit, chunk = _channel_splits(M, C)
    dims = (np.int32(s.N), np.int32(C), np.int32(s.Lout), np.int32(chunk))
    ws_g = cp.empty((nsplit, C), np.float32)
    ws_gx = cp.empty((nsplit, C), np.float32)
    _launch("conv1d_bn_relu", f"bn_bwd_reduce_{msuf}", (C, nsplit), (_THREADS,),
            (dy, z, gamma, beta, mean, invstd) + dims + (np.int32(bool(relu)), ws_g, ws_gx))
    coef = cp.empty((2 * C,), np.float32)
    _launch("conv1d_bn_relu", f"bn_bwd_finalize_{psuf}", (_cdiv(C, 128),), (128,),
            (ws_g, ws_gx, np.int32(nsplit), np.int32(C), np.int32(M), _ptr(dgamma),
             _ptr(dbeta), coef))
    if dx is None and dw is None and dbias is None:
        return
    dz = cp.empty(s.out, np.float32)
    ws_dz = cp.empty((nsplit, C), np.float32) if dbias is not None else None
    _launch("conv1d_bn_relu", f"bn_bwd_dz_{msuf}", (C, nsplit), (_THREADS,),
            (dy, z, gamma, beta, mean, invstd, coef) + dims
            + (np.int32(bool(relu)), np.int32(bool(batch_stats)), dz, _ptr(ws_dz)))
    if dbias is not None:
        _sum_splits(dsuf, ws_dz, nsplit, C, dbias)
    if dx is not None:
        _launch("conv1d_bn_relu", f"conv1d_bwd_data_{dsuf}",
                (_cdiv(s.N * s.L, _TILE), _cdiv(s.cin_g, _TILE), s.groups), (_THREADS,),
                s.args() + (dz, w, dx))
    if dw is not None:
        kw = s.cin_g * s.K
        tiles = _cdiv(kw, _TILE) * _cdiv(s.cout_g, _TILE) * s.groups
        # Split the long reduction over the batch so that small weights still fill the device.
        splits = max(1, min(_cdiv(2 * _sm_count(), tiles), _cdiv(M, 256),
                            _GRID_YZ_MAX // s.groups))
        kchunk = _cdiv(_cdiv(M, splits), _BK) * _BK
        splits = _cdiv(M, kchunk)
        ws = cp.empty((splits, s.Cout * kw), np.float32)
        _launch("conv1d_bn_relu", f"conv1d_bwd_weight_{dsuf}",
                (_cdiv(kw, _TILE), _cdiv(s.cout_g, _TILE), s.groups * splits), (_THREADS,),
                s.args() + (x, dz, np.int32(kchunk), ws))
        _sum_splits(dsuf, ws, splits, s.Cout * kw, dw)


def _sum_splits(dsuf, ws, nsplits, count, out):
    _launch("conv1d_bn_relu", f"sum_splits_{dsuf}",
            (min(_cdiv(count, _THREADS), 32 * _sm_count()),), (_THREADS,),
            (ws, np.int32(nsplits), np.int32(count), out))


# ---------------------------------------------------------------------------------------------
# add_relu

def _elementwise_grid(n, dtype):
    per_thread = 16 // np.dtype(dtype).itemsize  # one 16-byte vector
    return (max(1, min(_cdiv(n, per_thread * _THREADS), 32 * _sm_count())),)


def add_relu_forward(lhs, rhs, out):
    """out = max(lhs + rhs, 0)."""
    a, b, y = _check(lhs, "lhs"), _check(rhs, "rhs"), _check(out, "output")
    _same_dtype(a.dtype, [(b, "rhs"), (y, "output")], "lhs")
    _require(a.shape == b.shape, "lhs and rhs must have the same shape, got "
                                 f"{_shape_str(a.shape)} and {_shape_str(b.shape)}")
    _expect(y, "output", a.shape)
    if a.size:
        _launch("add_relu", f"add_relu_forward_{_SUFFIX[a.dtype]}",
                _elementwise_grid(a.size, a.dtype), (_THREADS,), (np.int64(a.size), a, b, y))


def add_relu_backward(out_grad, out, lhs_grad, rhs_grad):
    """lhs_grad = rhs_grad = out_grad * (out > 0); a None gradient is not written."""
    dy, y = _check(out_grad, "out_grad"), _check(out, "output")
    da, db = _check_opt(lhs_grad, "lhs_grad"), _check_opt(rhs_grad, "rhs_grad")
    _same_dtype(y.dtype, [(dy, "out_grad"), (da, "lhs_grad"), (db, "rhs_grad")], "output")
    _expect(dy, "out_grad", y.shape)
    _expect(da, "lhs_grad", y.shape)
    _expect(db, "rhs_grad", y.shape)
    if y.size and (da is not None or db is not None):
        _launch("add_relu", f"add_relu_backward_{_SUFFIX[y.dtype]}",
                _elementwise_grid(y.size, y.dtype), (_THREADS,),
                (np.int64(y.size), dy, y, _ptr(da), _ptr(db)))


# ---------------------------------------------------------------------------------------------
# MXNet interop

# Device types of the MXNet contexts whose arrays from_mxnet views and whose ops the GPU
# backend of fusedres.ops serves: MXNet's GPUs. A test hook: tests/cuda_emu/mxnet_gpu.py adds
# "cpu" to drive that backend with CPU NDArrays on the CUDA emulation, whose device memory is
# the host's (a real cupy.from_dlpack refuses a CPU capsule).
GPU_DEVICE_TYPES = ("gpu",)


def from_mxnet(arr, writable=False):
    """A CuPy view (no copy) of an MXNet GPU NDArray, through DLPack.

    writable=True exports with ``to_dlpack_for_write`` (MXNet waits for pending reads and
    writes), otherwise ``to_dlpack_for_read`` (waits for pending writes). Call inside
    ``mxnet_scope(arr.context)``.
    """
    cp = _cupy()
    ctx = arr.context
    if ctx.device_type not in GPU_DEVICE_TYPES:
        raise ValueError(f"from_mxnet needs a GPU NDArray, got one on {ctx}")
    capsule = arr.to_dlpack_for_write() if writable else arr.to_dlpack_for_read()
    with cp.cuda.Device(ctx.device_id):
        return cp.from_dlpack(capsule)


@contextlib.contextmanager
def mxnet_scope(ctx):
    """Selects ctx's GPU for CuPy and synchronizes CuPy's current stream on the way out.

    MXNet 1.9.1 cannot be told about CuPy's stream, so kernels launched here must have
    finished before an MXNet operator callback returns and MXNet reuses the buffers.
    """
    cp = _cupy()
    with cp.cuda.Device(ctx.device_id):
        try:
            yield
        finally:
            cp.cuda.get_current_stream().synchronize()
