"""A small case of every CUDA kernel fusedres launches, for compute-sanitizer (make gpu-check).

    compute-sanitizer --tool memcheck python tools/gpu_check_cases.py
    python tools/gpu_check_cases.py --which-cubin   # prints the cubin it would load, if any

Runs fusedres.cuda's functions on tiny odd-sized inputs, in every dtype combination, with CuPy's
memory pool off (each array its own cudaMalloc, so that memcheck knows its exact bounds), and
exits nonzero unless all 37 kernels ran and every output is finite. Needs CuPy and a GPU, not
MXNet.
"""
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
try:
    from fusedres import cuda
except ImportError:  # no MXNet: fusedres.cuda does not need it, fusedres/__init__.py does
    _pkg = types.ModuleType("fusedres")
    _pkg.__path__ = [str(ROOT / "fusedres")]
    sys.modules["fusedres"] = _pkg
    from fusedres import cuda
from fusedres.cuda import loader  # noqa: E402

import cupy as cp  # noqa: E402

EPS, MOMENTUM = 1e-5, 0.9
DTYPES = [(np.float32, np.float32), (np.float16, np.float16), (np.float16, np.float32)]


def conv_case(dt, pt, cin=8, cout=6, groups=2):
    """A grouped conv (the GEMM kernels) by default; cin == groups: a depthwise one."""
    n, width, k = 2, 37, 3
    rng = np.random.default_rng(0)

    def dev(shape, dtype, scale=1.0):
        return cp.asarray((scale * rng.standard_normal(shape)).astype(dtype))

    x, w, bias = dev((n, cin, width), dt), dev((cout, cin // groups, k), dt, 0.3), dev(cout, dt)
    gamma, beta = cp.asarray(rng.uniform(0.5, 1.5, cout).astype(pt)), dev(cout, pt)
    rm, rv = dev(cout, pt, 0.1), cp.asarray(rng.uniform(0.5, 2.0, cout).astype(pt))
    z, y = cp.empty((n, cout, width), dt), cp.empty((n, cout, width), dt)
    mean, invstd = cp.empty(cout, pt), cp.empty(cout, pt)
    outs = [z, y, mean, invstd]
    for batch_stats in (True, False):
        cuda.conv1d_bn_relu_forward_train(x, w, bias, gamma, beta, rm, rv, z, mean, invstd, y,
                                          1, 1, 1, groups, EPS, MOMENTUM, batch_stats, True)
        grads = [cp.empty_like(x), cp.empty_like(w), cp.empty_like(bias), cp.empty_like(gamma),
                 cp.empty_like(beta)]
        cuda.conv1d_bn_relu_backward(dev(y.shape, dt), x, w, z, gamma, beta, mean, invstd,
                                     *grads, 1, 1, 1, groups, batch_stats)
        outs += grads
    cuda.conv1d_bn_relu_forward_infer(x, w, bias, gamma, beta, rm, rv, y, 1, 1, 1, groups, EPS)
    return outs + [y, rm, rv]


def add_relu_case(dt):
    outs = []
    for offset in (0, 1):  # 1: not 16-byte aligned, the scalar path
        size = 1029
        bufs = [cp.asarray(np.random.default_rng(1).standard_normal(size + offset).astype(dt))
                for _ in range(5)]
        a, b, dy, da, y = (buf[offset:] for buf in bufs)
        cuda.add_relu_forward(a, b, y)
        cuda.add_relu_backward(dy, y, da, None)
        outs += [y, da]
    return outs


def main(argv):
    if argv == ["--which-cubin"]:  # the shipped cubin fusedres.cuda loads here, if any
        cc = cp.cuda.Device().compute_capability
        cubin = loader.cubin_for("conv1d_bn_relu", int(cc[:-1]), int(cc[-1]))
        print(cubin or "")
        return 0
    cp.cuda.set_allocator(None)
    launched = set()
    launch = loader.launch

    def recording(source, kernel, grid, block, args):
        launched.add(kernel)
        launch(source, kernel, grid, block, args)

    loader.launch = recording  # every kernel function launches through it
    outs = []
    for dt, pt in DTYPES:
        outs += conv_case(dt, pt)
        outs += conv_case(dt, pt, cin=4, cout=8, groups=4)  # depthwise, multiplier 2
    for dt in (np.float32, np.float16):
        outs += add_relu_case(dt)
    cp.cuda.Device().synchronize()
    expected = {k for names in cuda.KERNELS.values() for k in names}
    missing = sorted(expected - launched)
    bad = sum(not np.isfinite(cp.asnumpy(o)).all() for o in outs)
    print(f"gpu_check_cases: {len(launched)} of {len(expected)} kernels launched"
          + (f", missing {missing}" if missing else "") + f"; {bad} outputs not finite")
    return 1 if missing or bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
