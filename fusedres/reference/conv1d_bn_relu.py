import numpy as np


def relu_value(x):
    """MXNet's relu: max(x, 0) with NaN kept (np.maximum propagates NaN)."""
    return np.maximum(x, 0)


def relu_grad(pre):
    """MXNet's relu derivative at pre: 1 where pre > 0, 0 where pre <= 0, NaN where pre is
    NaN; a gradient is dy * relu_grad(pre), so a NaN or infinite dy is kept too (0 * inf)."""
    with np.errstate(invalid="ignore"):
        return np.where(pre > 0, 1.0, np.where(np.isnan(pre), np.nan, 0.0))


def conv1d_out_width(width, kernel, stride=1, pad=0, dilate=1):
    return (width + 2 * pad - dilate * (kernel - 1) - 1) // stride + 1


def _taps(x, kernel, stride, pad, dilate):
    """Input seen by each kernel tap: (N, C, K, Lout), zero padded."""
    n, c, width = x.shape
    lout = conv1d_out_width(width, kernel, stride, pad, dilate)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    return np.stack([xp[:, :, k * dilate: k * dilate + (lout - 1) * stride + 1: stride]
                     for k in range(kernel)], axis=2)


def conv1d(x, w, bias=None, stride=1, pad=0, dilate=1, num_group=1):
    """Grouped, strided, dilated 1-D cross-correlation, as MXNet's Convolution computes it."""
    cout, cin_g, kernel = w.shape
    taps = _taps(x, kernel, stride, pad, dilate)          # (N, Cin, K, Lout)
    cout_g = cout // num_group
    out = np.concatenate([
        np.einsum("nckl,ock->nol", taps[:, g * cin_g:(g + 1) * cin_g],
                  w[g * cout_g:(g + 1) * cout_g])
        for g in range(num_group)], axis=1)
    if bias is not None:
        out = out + bias[None, :, None]
    return out.astype(x.dtype)


def conv1d_backward(dz, x, w, stride=1, pad=0, dilate=1, num_group=1):
    """Gradients of conv1d w.r.t. data and weight (the bias gradient is dz summed over N, W)."""
    n, cin, width = x.shape
    cout, cin_g, kernel = w.shape
    cout_g = cout // num_group
    taps = _taps(x, kernel, stride, pad, dilate)
    dw = np.concatenate([
        np.einsum("nckl,nol->ock", taps[:, g * cin_g:(g + 1) * cin_g],
                  dz[:, g * cout_g:(g + 1) * cout_g])
        for g in range(num_group)], axis=0)
    dtaps = np.concatenate([
        np.einsum("ock,nol->nckl", w[g * cout_g:(g + 1) * cout_g],
                  dz[:, g * cout_g:(g + 1) * cout_g])
        for g in range(num_group)], axis=1)
    lout = dz.shape[2]
    dxp = np.zeros((n, cin, width + 2 * pad), dtype=np.result_type(dz, x))
    for k in range(kernel):
        dxp[:, :, k * dilate: k * dilate + (lout - 1) * stride + 1: stride] += dtaps[:, :, k]
    return dxp[:, :, pad: pad + width].astype(x.dtype), dw.astype(w.dtype)


def conv1d_bn_relu_forward(x, w, bias, gamma, beta, running_mean, running_var, stride=1, pad=0,
                           dilate=1, num_group=1, eps=1e-5, momentum=0.9, is_train=True,
                           use_global_stats=False, relu=True):
    """relu(batchnorm(conv1d(x))); batchnorm(conv1d(x)) with relu=False.

    is_train and not use_global_stats: normalize with the batch mean and biased variance over
    (N, W), and return running statistics updated as MXNet does,
    ``running = momentum * running + (1 - momentum) * batch``.
    Otherwise normalize with the running statistics, which are returned unchanged.

    Returns (y, cache, new_running_mean, new_running_var); cache feeds the backward.
    """
    z = conv1d(x, w, bias, stride, pad, dilate, num_group)
    batch_stats = is_train and not use_global_stats
    if batch_stats:
        mean = z.mean(axis=(0, 2))
        var = z.var(axis=(0, 2))
        new_rm = momentum * running_mean + (1 - momentum) * mean
        new_rv = momentum * running_var + (1 - momentum) * var
    else:
        mean, var = running_mean, running_var
        new_rm, new_rv = running_mean.copy(), running_var.copy()
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (z - mean[None, :, None]) * invstd[None, :, None]
    pre = gamma[None, :, None] * xhat + beta[None, :, None]
    y = (relu_value(pre) if relu else pre).astype(x.dtype)
    cache = dict(x=x, w=w, has_bias=bias is not None, gamma=gamma, xhat=xhat, invstd=invstd,
                 pre=pre, relu=relu, batch_stats=batch_stats, stride=stride, pad=pad,
                 dilate=dilate, num_group=num_group)
    return (y, cache, new_rm.astype(running_mean.dtype), new_rv.astype(running_var.dtype))


def conv1d_bn_relu_backward(dy, cache):
    """Gradients w.r.t. data, weight, bias (None without bias), gamma and beta, as a dict."""
    c = cache
    with np.errstate(invalid="ignore"):
        g = dy * relu_grad(c["pre"]) if c["relu"] else dy
    xhat, invstd, gamma = c["xhat"], c["invstd"], c["gamma"]
    dbeta = g.sum(axis=(0, 2))
    dgamma = (g * xhat).sum(axis=(0, 2))
    dxhat = g * gamma[None, :, None]
    if c["batch_stats"]:
        m = g.shape[0] * g.shape[2]
        dz = invstd[None, :, None] / m * (
            m * dxhat - dxhat.sum(axis=(0, 2), keepdims=True)
            - xhat * (dxhat * xhat).sum(axis=(0, 2), keepdims=True))
    else:
        dz = dxhat * invstd[None, :, None]
    dx, dw = conv1d_backward(dz, c["x"], c["w"], c["stride"], c["pad"], c["dilate"],
                             c["num_group"])
    dt = dy.dtype
    return dict(data=dx, weight=dw,
                bias=dz.sum(axis=(0, 2)).astype(dt) if c["has_bias"] else None,
                gamma=dgamma.astype(dt), beta=dbeta.astype(dt))
