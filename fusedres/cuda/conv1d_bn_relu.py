"""conv1d_bn_relu on CuPy arrays: shape checks and launch heuristics of csrc/cuda/conv1d_bn_relu.cu.

Data may be float32 or float16; the per-channel batchnorm arrays (gamma, beta, running and saved
statistics) have the data's dtype or float32, as Gluon keeps them under ``cast('float16')``.

Each conv (forward, data and weight gradients) is the implicit GEMM of the conv1d_* kernels, or,
for a depthwise conv (one input channel per group and at most 8 output channels per group, the
CPU engine's rule), a conv1d_dw_* kernel. Both write the same intermediate layouts (the column
tiles' statistics, the weight gradient's split workspace), so the batchnorm kernels and
sum_splits serve both; the depthwise path gives the GEMM's numbers bit for bit except for the
weight gradient (another order of summation), and takes any num_group.
"""
import numpy as np

from ..attrs import ConvAttrs
from . import loader
from .checks import SUFFIX, check, check_opt, expect, require, same_dtype
from .loader import THREADS, cdiv, ptr, sm_count

# Entry points of csrc/cuda/conv1d_bn_relu.cu, as launched below (tests check the cubins have
# them): by data dtype, or by (data, per-channel) dtypes. conv1d_dw_*: the depthwise convs.
KERNELS = tuple(
    [f"{k}_{s}" for k in ("conv1d_fwd_train", "conv1d_bwd_data", "conv1d_bwd_weight",
                          "conv1d_dw_fwd_train", "conv1d_dw_bwd_data", "conv1d_dw_bwd_weight",
                          "sum_splits", "bn_fwd_finalize", "bn_bwd_finalize")
     for s in ("f32", "f16")]
    + [f"{k}_{s}" for k in ("conv1d_fwd_infer", "conv1d_dw_fwd_infer", "bn_relu_apply",
                            "bn_bwd_reduce", "bn_bwd_dz")
       for s in ("f32", "f16", "f16_p32")])

_SOURCE = "conv1d_bn_relu"
_TILE = 64           # output tile of the conv kernels (BM = BN in conv1d_bn_relu.cu)
_BK = 16             # depth of one shared-memory slice
# The conv kernels index with int32 and let a tile's threads compute indices past a tensor's
# end, so each conv tensor stays 2^16 elements below INT32_MAX (csrc/cuda/conv1d_bn_relu.cu).
_CONV_MAX_ELEMENTS = 2**31 - 2**16
_GRID_X_MAX = 2**31 - 1
_GRID_YZ_MAX = 65535
_MAX_ROWS = _GRID_YZ_MAX * _TILE  # channels per group: their tiles go on the grid's y axis
# Depthwise convs (one input channel per group, at most this many output channels per group:
# the CPU engine's rule, csrc/cpu/engine/depthwise.h) run the conv1d_dw_* kernels.
_DEPTHWISE_MAX_MULTIPLIER = 8
_DW_TAPS = 8  # weight-gradient taps per block of conv1d_dw_bwd_weight (DW_TAPS)


def _conv_check(a, name):
    return check(a, name, _CONV_MAX_ELEMENTS)


def _conv_check_opt(a, name):
    return check_opt(a, name, _CONV_MAX_ELEMENTS)


class _ConvShape:
    """The checks of fusedres.attrs.ConvAttrs.for_kernel, then the CUDA kernels' own limits;
    ``depthwise``: whether the conv1d_dw_* kernels run it."""

    def __init__(self, x, w, stride, pad, dilate, num_group, eps=1e-5, momentum=0.9):
        a = ConvAttrs.for_kernel(x.shape, w.shape, stride, pad, dilate, num_group, eps, momentum)
        self.N, self.Cin, self.L = x.shape
        self.Cout, self.K = a.num_filter, a.kernel
        self.stride, self.pad, self.dilate, self.num_group = a.stride, a.pad, a.dilate, a.num_group
        self.Lout = a.out_width(self.L)
        self.cin_g, self.cout_g = self.Cin // a.num_group, self.Cout // a.num_group
        self.depthwise = self.cin_g == 1 and self.cout_g <= _DEPTHWISE_MAX_MULTIPLIER
        # The GEMM kernels put the groups on the grid's z axis; the depthwise ones do not.
        require(self.depthwise or a.num_group <= _GRID_YZ_MAX,
                f"num_group must be <= {_GRID_YZ_MAX} for the CUDA kernels, got {a.num_group}")
        require(self.cout_g <= _MAX_ROWS, f"weight's out_channels per group ({self.cout_g}) "
                                          f"must be <= {_MAX_ROWS} for the CUDA kernels")
        require(self.cin_g <= _MAX_ROWS, f"data's channels per group ({self.cin_g}) must be "
                                         f"<= {_MAX_ROWS} for the CUDA kernels")
        self.M = self.N * self.Lout
        out = self.N * self.Cout * self.Lout
        # Input positions reach L + pad - 1 < 2^32 (both at most 2^31 - 1): the kernels compute
        # them modulo 2^32, which needs nothing more.
        require(out <= _CONV_MAX_ELEMENTS,
                f"pad ({a.pad}) and stride ({a.stride}) give an output of {self.N} x {self.Cout} "
                f"x {self.Lout} elements; the CUDA kernels take at most {_CONV_MAX_ELEMENTS}")

    @property
    def out(self):
        return (self.N, self.Cout, self.Lout)

    def args(self):
        return tuple(np.int32(v) for v in (self.N, self.Cin, self.L, self.Cout, self.K, self.Lout,
                                           self.stride, self.pad, self.dilate, self.num_group))


def _grid(*dims):
    """A launch grid, checked against CUDA's limits (x < 2^31, y and z <= 65535). The depthwise
    grids stay below them for every shape _ConvShape accepts; this is the backstop."""
    limits = (_GRID_X_MAX, _GRID_YZ_MAX, _GRID_YZ_MAX)
    for axis, (d, most) in enumerate(zip(dims, limits)):
        require(d <= most, f"grid {dims} exceeds the CUDA limit of {most} blocks on axis "
                           f"{'xyz'[axis]}")
    return dims


def _param_dtype(data, gamma):
    """dtype of the per-channel arrays: gamma's, which must be data's or float32."""
    if gamma.dtype != data.dtype and gamma.dtype != np.float32:
        raise TypeError(f"gamma must have the same dtype as data or be float32, got {gamma.dtype}")
    return gamma.dtype


def _mixed(data_dtype, param_dtype):
    d, p = SUFFIX[data_dtype], SUFFIX[param_dtype]
    return d if d == p else f"{d}_p32"


def _channel_splits(per_channel, channels):
    """(splits, chunk) for the per-channel reductions: enough blocks to fill the device."""
    want = cdiv(4 * sm_count(), channels)
    splits = max(1, min(want, cdiv(per_channel, 2048), _GRID_YZ_MAX))
    chunk = cdiv(per_channel, splits)
    return cdiv(per_channel, chunk), chunk


def conv1d_bn_relu_forward_train(data, weight, bias, gamma, beta, running_mean, running_var, z,
                                 mean, invstd, out, stride, pad, dilate, num_group, eps, momentum,
                                 batch_stats, relu=True):
    """Conv1d+BN+ReLU forward keeping z (conv output), mean and invstd for backward.

    With batch_stats (an op's ``is_train and not use_global_stats``), normalizes with the batch
    mean and biased variance and sets ``running = momentum * running + (1 - momentum) * batch``;
    otherwise normalizes with the running statistics and leaves them alone.
    """
    cp = loader.import_cupy()
    x, w = _conv_check(data, "data"), _conv_check(weight, "weight")
    bias = _conv_check_opt(bias, "bias")
    chans = [(_conv_check(a, n), n) for a, n in ((gamma, "gamma"), (beta, "beta"),
                                                 (running_mean, "running_mean"),
                                                 (running_var, "running_var"),
                                                 (mean, "saved mean"), (invstd, "saved invstd"))]
    z, out = _conv_check(z, "saved conv output"), _conv_check(out, "output")
    same_dtype(x.dtype, [(w, "weight"), (bias, "bias"), (z, "saved conv output"),
                         (out, "output")], "data")
    pdt = _param_dtype(x, gamma)
    same_dtype(pdt, chans[1:], "gamma")
    s = _ConvShape(x, w, stride, pad, dilate, num_group, eps, momentum)
    for a, n in [(bias, "bias")] + chans:
        expect(a, n, (s.Cout,))
    expect(z, "saved conv output", s.out)
    expect(out, "output", s.out)

    dsuf, psuf = SUFFIX[x.dtype], SUFFIX[pdt]
    ntiles = cdiv(s.M, _TILE)
    if batch_stats:
        psum = cp.empty((ntiles, s.Cout), np.float32)
        pm2 = cp.empty((ntiles, s.Cout), np.float32)
    else:
        psum = pm2 = None
    if s.depthwise:  # a half warp (16 threads) per (channel, column tile)
        name, grid = "conv1d_dw_fwd_train", _grid(cdiv(s.Cout * ntiles, THREADS // 16))
    else:
        name, grid = "conv1d_fwd_train", (ntiles, cdiv(s.cout_g, _TILE), s.num_group)
    loader.launch(_SOURCE, f"{name}_{dsuf}", grid, (THREADS,),
                  s.args() + (x, w, ptr(bias), z, ptr(psum), ptr(pm2),
                              np.int32(bool(batch_stats))))
    loader.launch(_SOURCE, f"bn_fwd_finalize_{psuf}", (s.Cout,), (THREADS,),
                  (ptr(psum), ptr(pm2), np.int32(ntiles), np.int32(s.M), np.int32(s.Cout),
                   running_mean, running_var, mean, invstd, np.float64(eps), np.float64(momentum),
                   np.int32(bool(batch_stats))))
    rows = s.N * s.Cout
    loader.launch(_SOURCE, f"bn_relu_apply_{_mixed(x.dtype, pdt)}",
                  (min(rows, 32 * sm_count()),), (THREADS,),
                  (z, gamma, beta, mean, invstd, np.int32(rows), np.int32(s.Cout),
                   np.int32(s.Lout), np.int32(bool(relu)), out))


def conv1d_bn_relu_forward_infer(data, weight, bias, gamma, beta, running_mean, running_var, out,
                                 stride, pad, dilate, num_group, eps, relu=True):
    """Conv1d+BN+ReLU inference in one pass: BN applied in the conv epilogue, in BatchNorm's
    order with the running statistics."""
    x, w = _conv_check(data, "data"), _conv_check(weight, "weight")
    bias = _conv_check_opt(bias, "bias")
    chans = [(_conv_check(a, n), n) for a, n in ((gamma, "gamma"), (beta, "beta"),
                                                 (running_mean, "running_mean"),
                                                 (running_var, "running_var"))]
    out = _conv_check(out, "output")
    same_dtype(x.dtype, [(w, "weight"), (bias, "bias"), (out, "output")], "data")
    pdt = _param_dtype(x, gamma)
    same_dtype(pdt, chans[1:], "gamma")
    s = _ConvShape(x, w, stride, pad, dilate, num_group, eps)
    for a, n in [(bias, "bias")] + chans:
        expect(a, n, (s.Cout,))
    expect(out, "output", s.out)
    if s.depthwise:  # a thread per output
        name, grid = "conv1d_dw_fwd_infer", _grid(cdiv(s.N * s.Cout * s.Lout, THREADS))
    else:
        name, grid = "conv1d_fwd_infer", (cdiv(s.M, _TILE), cdiv(s.cout_g, _TILE), s.num_group)
    loader.launch(_SOURCE, f"{name}_{_mixed(x.dtype, pdt)}", grid, (THREADS,),
                  s.args() + (x, w, ptr(bias), gamma, beta, running_mean, running_var,
                              np.float32(eps), np.int32(bool(relu)), out))


def conv1d_bn_relu_backward(out_grad, data, weight, z, gamma, beta, mean, invstd, data_grad,
                            weight_grad, bias_grad, gamma_grad, beta_grad, stride, pad, dilate,
                            num_group, batch_stats, relu=True):
    """Conv1d+BN+ReLU backward from what forward_train saved; a None gradient is not computed.

    batch_stats must match the forward: with batch statistics the gradient also flows through
    the mean and variance.
    """
    cp = loader.import_cupy()
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
    same_dtype(x.dtype, [(dy, "out_grad"), (w, "weight"), (z, "saved conv output"),
                         (dx, "data_grad"), (dw, "weight_grad"), (dbias, "bias_grad")], "data")
    pdt = _param_dtype(x, gamma)
    same_dtype(pdt, chans[1:] + [(dgamma, "gamma_grad"), (dbeta, "beta_grad")], "gamma")
    s = _ConvShape(x, w, stride, pad, dilate, num_group)
    expect(dy, "out_grad", s.out)
    expect(z, "saved conv output", s.out)
    for a, n in chans + [(dbias, "bias_grad"), (dgamma, "gamma_grad"), (dbeta, "beta_grad")]:
        expect(a, n, (s.Cout,))
    expect(dx, "data_grad", x.shape)
    expect(dw, "weight_grad", w.shape)

    dsuf, psuf, msuf = SUFFIX[x.dtype], SUFFIX[pdt], _mixed(x.dtype, pdt)
    C, M = s.Cout, s.M
    nsplit, chunk = _channel_splits(M, C)
    dims = (np.int32(s.N), np.int32(C), np.int32(s.Lout), np.int32(chunk))
    ws_g = cp.empty((nsplit, C), np.float32)
    ws_gx = cp.empty((nsplit, C), np.float32)
    loader.launch(_SOURCE, f"bn_bwd_reduce_{msuf}", (C, nsplit), (THREADS,),
                  (dy, z, gamma, beta, mean, invstd) + dims + (np.int32(bool(relu)), ws_g, ws_gx))
    coef = cp.empty((2 * C,), np.float32)
    loader.launch(_SOURCE, f"bn_bwd_finalize_{psuf}", (cdiv(C, 128),), (128,),
                  (ws_g, ws_gx, np.int32(nsplit), np.int32(C), np.int32(M), ptr(dgamma),
                   ptr(dbeta), coef))
    if dx is None and dw is None and dbias is None:
        return
    dz = cp.empty(s.out, np.float32)
    ws_dz = cp.empty((nsplit, C), np.float32) if dbias is not None else None
    loader.launch(_SOURCE, f"bn_bwd_dz_{msuf}", (C, nsplit), (THREADS,),
                  (dy, z, gamma, beta, mean, invstd, coef) + dims
                  + (np.int32(bool(relu)), np.int32(bool(batch_stats)), dz, ptr(ws_dz)))
    if dbias is not None:
        _sum_splits(dsuf, ws_dz, nsplit, C, dbias)
    if dx is not None:
        if s.depthwise:  # a thread per input element
            name, grid = "conv1d_dw_bwd_data", _grid(cdiv(x.size, THREADS))
        else:
            name, grid = "conv1d_bwd_data", (cdiv(s.N * s.L, _TILE), cdiv(s.cin_g, _TILE),
                                             s.num_group)
        loader.launch(_SOURCE, f"{name}_{dsuf}", grid, (THREADS,), s.args() + (dz, w, dx))
    if dw is not None and s.depthwise:
        # A block per (channel, DW_TAPS taps, split of the batch's columns), as many splits as
        # fill the device (the per-channel reductions' rule); ws[split][co * K + tap].
        blocks = s.Cout * cdiv(s.K, _DW_TAPS)
        splits, chunk = _channel_splits(M, blocks)
        ws = cp.empty((splits, s.Cout * s.K), np.float32)
        loader.launch(_SOURCE, f"conv1d_dw_bwd_weight_{dsuf}", _grid(blocks, splits), (THREADS,),
                      s.args() + (x, dz, np.int32(chunk), ws))
        _sum_splits(dsuf, ws, splits, s.Cout * s.K, dw)
    elif dw is not None:
        kw = s.cin_g * s.K
        tiles = cdiv(kw, _TILE) * cdiv(s.cout_g, _TILE) * s.num_group
        # Split the long reduction over the batch so that small weights still fill the device.
        splits = max(1, min(cdiv(2 * sm_count(), tiles), cdiv(M, 256),
                            _GRID_YZ_MAX // s.num_group))
        kchunk = cdiv(cdiv(M, splits), _BK) * _BK
        splits = cdiv(M, kchunk)
        ws = cp.empty((splits, s.Cout * kw), np.float32)
        loader.launch(_SOURCE, f"conv1d_bwd_weight_{dsuf}",
                      (cdiv(kw, _TILE), cdiv(s.cout_g, _TILE), s.num_group * splits), (THREADS,),
                      s.args() + (x, dz, np.int32(kchunk), ws))
        _sum_splits(dsuf, ws, splits, s.Cout * kw, dw)


def _sum_splits(dsuf, ws, nsplits, count, out):
    loader.launch(_SOURCE, f"sum_splits_{dsuf}",
                  (min(cdiv(count, THREADS), 32 * sm_count()),), (THREADS,),
                  (ws, np.int32(nsplits), np.int32(count), out))
