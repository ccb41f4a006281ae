"""Which implementation runs an op: the one rule.

* The MXNet operators (:mod:`fusedres.ops.native`) run every CPU op: MXNet's full operator
  contract at a built-in op's cost.
* The CustomOps (:mod:`fusedres.ops.custom`) run on GPUs (the CUDA kernels through CuPy),
  where the device is unknown on an MXNet built with CUDA (a Symbol built before it is bound),
  when asked for (``use_native=False``, ``FUSEDRES_NATIVE=0``), and, with a warning, when the
  operators cannot be loaded into this MXNet.
"""
import os
import warnings

import mxnet as mx

from . import custom, native
from .backends import is_cpu

_warned = []


def _mxnet_has_cuda():
    return mx.runtime.Features().is_enabled("CUDA")


def choose(use_native=None, ctx=None):
    """The module (native or custom) that runs an op on data in ``ctx`` (None: unknown).

    use_native: None picks by the rule above; True requires the MXNet operators (ValueError
    if they cannot serve ctx); False always takes the CustomOps.
    """
    if use_native is False or os.environ.get("FUSEDRES_NATIVE", "1") == "0":
        return custom
    if ctx is not None and not is_cpu(ctx):
        if use_native:
            raise ValueError(f"use_native=True but data is on {ctx}: the MXNet operators run "
                             "on the CPU")
        return custom
    if ctx is None and use_native is None and _mxnet_has_cuda():
        return custom
    ok, why = native.available()
    if ok:
        return native
    if use_native:
        raise ValueError(f"use_native=True but the MXNet operators are unavailable: {why}")
    if not _warned:
        _warned.append(why)
        warnings.warn(f"fusedres: the MXNet operators are unavailable ({why}); the CPU path "
                      "falls back to the CustomOps (same results, about 10x the per-call cost)",
                      RuntimeWarning, stacklevel=3)
    return custom


__all__ = ["choose"]
