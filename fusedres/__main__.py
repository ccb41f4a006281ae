"""``python -m fusedres``: what is available here, is it right, and is it faster."""
import os
import platform
import sys

import mxnet as mx
import numpy as np

from . import __version__, benchmarks, cuda, ops, reference


# The CPython versions fusedres is built and tested for: the wheels of `make wheels` (the
# Makefile's WHEEL_PYTHONS), pyproject.toml's requires-python and classifiers.
TESTED_PYTHONS = ((3, 8), (3, 9), (3, 10), (3, 11))


def untested_python_warning(version_info):
    """The line `python -m fusedres` prints on a Python outside TESTED_PYTHONS (None inside)."""
    version = tuple(version_info[:2])
    if version in TESTED_PYTHONS:
        return None
    tested = ", ".join("%d.%d" % v for v in TESTED_PYTHONS)
    return (f"WARNING: Python {version[0]}.{version[1]} is untested: fusedres {__version__} is "
            f"built and tested for CPython {tested} only")


def shipped_cubins():
    """{op family: sorted sm_XX} of the cubins in fusedres/cubins."""
    found = {name: sorted(p.name[len(name) + 1:-len(".cubin")]
                          for p in cuda.CUBIN_DIR.glob(f"{name}.sm_*.cubin"))
             for name in cuda.KERNELS}
    return found


def environment():
    """Prints what is here; returns the list of missing parts (empty when complete)."""
    missing = []
    feats = mx.runtime.Features()
    print(f"fusedres {__version__} | Python {platform.python_version()} | "
          f"MXNet {mx.__version__} (MKLDNN {'on' if feats.is_enabled('MKLDNN') else 'off'}, "
          f"CUDA {'on' if feats.is_enabled('CUDA') else 'off'}) | numpy {np.__version__}")
    warning = untested_python_warning(sys.version_info)
    if warning:
        print(warning)
    from . import _C
    print(f"CPU kernels:     fusedres._C loaded from {os.path.basename(_C.__file__)}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} cores")
    copies = os.environ.get("MXNET_CPU_PARALLEL_SIZE")
    print(f"MXNet copies:    MXNET_CPU_PARALLEL_SIZE={copies or 'unset (MXNet: 200000)'}"
          + ("" if copies else "; a copy of 200000+ elements to or from numpy can slow every later "
             "MXNet call: set it to 2000000000 before MXNet loads (README)"))
    ok, why = ops.native.available()
    if ok:
        print(f"MXNet operators: {ops.CONV1D_BN_RELU}, {ops.ADD_RELU} registered from "
              f"{os.path.basename(why)} (the blocks' CPU path)")
    else:
        print(f"MXNet operators: UNAVAILABLE: {why}\n"
              "                 the blocks fall back to the CustomOps on the CPU (same results, "
              "about 10x the per-call cost)")
        missing.append("MXNet operators")
    cubins = shipped_cubins()
    archs = sorted(set.intersection(*(set(v) for v in cubins.values())))
    if archs:
        print(f"CUDA cubins:     {', '.join(archs)} for {', '.join(sorted(cubins))}")
    else:
        print(f"CUDA cubins:     MISSING in {cuda.CUBIN_DIR} (GPUs would compile the kernels "
              "from source with CuPy's NVRTC)")
        missing.append("CUDA cubins")
    ok, why = cuda.available()
    print(f"CUDA device:     {'available: ' if ok else 'none: '}{why}")
    return missing


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))


def _implementations():
    """(label, use_native) of the implementations that run here."""
    ok, _ = ops.native.available()
    if ok:
        yield "MXNet op", True
    yield "CustomOp", False


def correctness():
    """Each fused op, in each implementation, against the numpy reference on random inputs,
    with autograd."""
    rng = np.random.default_rng(0)
    print("\nCorrectness against the numpy reference (max error / max |reference|):")
    print(f"  {'op':<25}{'shape':<22}{'dtype':<9}{'forward':>10}{'backward':>10}")
    worst = 0.0
    for dtype, tol in ((np.float64, 1e-9), (np.float32, 2e-4)):
        for n, c, w, k, stride, pad in ((4, 7, 97, 3, 1, 1), (8, 64, 256, 3, 2, 1)):
            x = rng.standard_normal((n, c, w))
            wt = rng.standard_normal((c, c, k)) / np.sqrt(c * k)
            vec = [rng.standard_normal(c), rng.uniform(0.5, 1.5, c), rng.standard_normal(c),
                   np.zeros(c), np.ones(c)]
            y_ref, cache, _, _ = reference.conv1d_bn_relu_forward(
                x, wt, vec[0], vec[1], vec[2], vec[3], vec[4], stride, pad)
            dy = rng.standard_normal(y_ref.shape) * (np.abs(cache["pre"]) > 1e-3)
            g_ref = reference.conv1d_bn_relu_backward(dy, cache)
            for impl_name, use_native in _implementations():
                arrs = [mx.nd.array(a, dtype=dtype) for a in [x, wt] + vec]
                for a in arrs[:5]:
                    a.attach_grad()
                with mx.autograd.record():
                    y = ops.conv1d_bn_relu(*arrs, kernel=k, num_filter=c, stride=stride,
                                           pad=pad, use_native=use_native)
                y.backward(mx.nd.array(dy, dtype=dtype))
                fe = _rel_err(y.asnumpy(), y_ref)
                be = max(_rel_err(a.grad.asnumpy(), g_ref[name]) for a, name in
                         zip(arrs[:5], ["data", "weight", "bias", "gamma", "beta"]))
                worst = max(worst, fe / tol, be / tol)
                print(f"  {'conv1d_bn_relu ' + impl_name:<25}"
                      f"{str((n, c, w)) + f' k{k} s{stride}':<22}"
                      f"{np.dtype(dtype).name:<9}{fe:>10.1e}{be:>10.1e}")
        a, b = rng.standard_normal((3, 5, 1025)), rng.standard_normal((3, 5, 1025))
        for impl_name, use_native in _implementations():
            xa, xb = mx.nd.array(a, dtype=dtype), mx.nd.array(b, dtype=dtype)
            xa.attach_grad()
            with mx.autograd.record():
                y = ops.add_relu(xa, xb, use_native=use_native)
            y.backward()
            fe = _rel_err(y.asnumpy(), reference.add_relu_forward(a, b))
            be = _rel_err(xa.grad.asnumpy(), (a + b > 0).astype(float))
            worst = max(worst, fe / tol, be / tol)
            print(f"  {'add_relu ' + impl_name:<25}{str((3, 5, 1025)):<22}"
                  f"{np.dtype(dtype).name:<9}{fe:>10.1e}{be:>10.1e}")
    print(f"  {'PASS' if worst <= 1 else 'FAIL'}: worst error is {worst:.2g} x the tolerance")
    return worst <= 1


def timing(names):
    print("\nfused vs stock Gluon, float32, median ms (interleaved runs; lower is better)")
    print("  training step = forward+backward; stock = the fastest stock path measured:\n"
          "  Conv2D(1,k) on data kept (N, C, 1, W) ('4-D'), the per-layer expand_dims workaround\n"
          "  (training; 1-D Conv1D+BatchNorm crashes in backward) or Conv1D (inference)")
    print(f"  {'shape':<36}{'mode':<7}{'fused':>9}{'stock':>9}{'':<13}{'speed-up':>9}"
          f"{'GFLOP/s':>9}")
    for shape in benchmarks.SHAPES:
        if shape.name not in names:
            continue
        for mode in ("train", "infer"):
            reps = 20 if shape.conv_gflop < 0.5 else 8
            med = benchmarks.interleaved_medians(benchmarks.conv_contenders(shape, mode), reps)
            flop = shape.conv_gflop * (3 if mode == "train" else 1)
            which, stock = benchmarks.best_stock(med)
            print(f"  {shape.label:<36}{mode:<7}{med['fused'] * 1e3:>9.2f}{stock * 1e3:>9.2f}"
                  f" {'(' + which[len('stock '):] + ')':<12}{stock / med['fused']:>8.2f}x"
                  f"{flop / med['fused']:>9.1f}")
    med = benchmarks.interleaved_medians(benchmarks.add_relu_contenders(), 30)
    print(f"  {'add_relu (2, 1024, 1024)':<36}{'fwd':<7}{med['fused'] * 1e3:>9.2f}"
          f"{med['stock'] * 1e3:>9.2f}{med['stock'] / med['fused']:>9.2f}x")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    missing = environment()
    ok = correctness()
    timing(argv or ["tiny", "pointwise-k1", "reference"])
    if missing:
        print(f"\nINCOMPLETE INSTALL: {' and '.join(missing)} missing (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
