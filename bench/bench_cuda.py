"""fusedres CUDA kernels against PyTorch eager cuDNN and against a device-to-device copy.

    python bench/bench_cuda.py [--reps 50] [--out bench/results_cuda.md]

conv1d_bn_relu: training step (forward + backward: data, weight, bias, gamma, beta) and
inference forward, against Conv1d + BatchNorm1d + ReLU in PyTorch (when torch with CUDA is
importable), fed the very same device buffers through DLPack. add_relu: forward and backward
against torch and against a same-size device-to-device copy (the bandwidth ceiling).
Times are medians of CUDA-event-timed repetitions after warm-up; GFLOP/s and GB/s beside them.
Without CuPy or a GPU it prints why and exits 0.
"""
import argparse
import datetime
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
try:
    from fusedres import cuda
except ImportError:  # no MXNet (a GPU machine with CuPy only): fusedres.cuda does not need it
    _pkg = types.ModuleType("fusedres")
    _pkg.__path__ = [str(ROOT / "fusedres")]
    sys.modules["fusedres"] = _pkg
    from fusedres import cuda
from fusedres.cuda import loader  # noqa: E402

# (N, C, W, kernel, groups): the shared table of shapes; padding keeps W; groups = C: depthwise.
SHAPES = [(32, 64, 1024, 3, 1), (64, 256, 4096, 3, 1), (16, 512, 8192, 5, 1),
          (32, 256, 4096, 3, 256), (32, 256, 4096, 33, 256)]
DTYPES = [np.float32, np.float16]
EPS, MOMENTUM = 1e-5, 0.9


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def time_ms(fn, reps, warmup=5):
    import cupy as cp
    for _ in range(warmup):
        fn()
    stream = cp.cuda.get_current_stream()
    stream.synchronize()
    times = []
    for _ in range(reps):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        fn()
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def bench_conv(shape, dtype, reps, torch):
    import cupy as cp
    n, c, width, k, groups = shape
    pad = k // 2
    rng = cp.random.default_rng(0)
    x = rng.standard_normal((n, c, width), dtype=np.float32).astype(dtype)
    cin_g = c // groups
    w = (rng.standard_normal((c, cin_g, k), dtype=np.float32) / np.sqrt(cin_g * k)).astype(dtype)
    bias = cp.zeros(c, dtype)
    gamma, beta = cp.ones(c, np.float32), cp.zeros(c, np.float32)  # float32, as Gluon keeps them
    rm, rv = cp.zeros(c, np.float32), cp.ones(c, np.float32)
    z, y, dy = cp.empty_like(x), cp.empty_like(x), cp.ones_like(x)
    mean, invstd = cp.empty(c, np.float32), cp.empty(c, np.float32)
    dx, dw, db = cp.empty_like(x), cp.empty_like(w), cp.empty_like(bias)
    dg, dbeta = cp.empty_like(gamma), cp.empty_like(beta)

    def train():
        cuda.conv1d_bn_relu_forward_train(x, w, bias, gamma, beta, rm, rv, z, mean, invstd, y,
                                          1, pad, 1, groups, EPS, MOMENTUM, True, True)
        cuda.conv1d_bn_relu_backward(dy, x, w, z, gamma, beta, mean, invstd, dx, dw, db, dg,
                                     dbeta, 1, pad, 1, groups, True)

    def infer():
        cuda.conv1d_bn_relu_forward_infer(x, w, bias, gamma, beta, rm, rv, y, 1, pad, 1, groups,
                                          EPS)

    flop = 2.0 * n * c * width * cin_g * k  # one conv
    rows = [("conv1d_bn_relu train step", "fusedres", time_ms(train, reps), 3 * flop, None),
            ("conv1d_bn_relu inference", "fusedres", time_ms(infer, reps), flop, None)]
    if torch is not None:
        tx = torch.from_dlpack(x).requires_grad_(True)
        conv = torch.nn.Conv1d(c, c, k, padding=pad, groups=groups).cuda().to(tx.dtype)
        bn = torch.nn.BatchNorm1d(c, eps=EPS, momentum=1 - MOMENTUM).cuda()  # float32 params
        with torch.no_grad():
            conv.weight.copy_(torch.from_dlpack(w))
        tdy = torch.from_dlpack(dy)

        def t_train():  # gradients written, not accumulated, as fusedres does
            tx.grad = None
            conv.zero_grad(set_to_none=True)
            bn.zero_grad(set_to_none=True)
            torch.relu(bn(conv(tx))).backward(tdy)

        def t_infer():
            with torch.no_grad():
                torch.relu(torch.nn.functional.batch_norm(
                    conv(tx), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                    EPS))

        rows += [("conv1d_bn_relu train step", "torch eager (cuDNN)", time_ms(t_train, reps),
                  3 * flop, None),
                 ("conv1d_bn_relu inference", "torch eager (cuDNN)", time_ms(t_infer, reps),
                  flop, None)]
    return rows


def bench_add_relu(shape, dtype, reps, torch):
    import cupy as cp
    n, c, width = shape[:3]
    rng = cp.random.default_rng(0)
    a, b, dy = (rng.standard_normal((n, c, width), dtype=np.float32).astype(dtype)
                for _ in range(3))
    y, da, db = cp.empty_like(a), cp.empty_like(a), cp.empty_like(a)
    nbytes = a.nbytes
    rows = [("add_relu forward", "fusedres",
             time_ms(lambda: cuda.add_relu_forward(a, b, y), reps), None, 3 * nbytes),
            ("add_relu backward", "fusedres",
             time_ms(lambda: cuda.add_relu_backward(dy, y, da, db), reps), None, 4 * nbytes),
            ("device copy (same size)", "cupy", time_ms(lambda: cp.copyto(y, a), reps), None,
             2 * nbytes)]
    if torch is not None:
        ta, tb = torch.from_dlpack(a), torch.from_dlpack(b)
        rows.append(("add_relu forward", "torch eager",
                     time_ms(lambda: torch.relu(ta + tb), reps), None, 3 * nbytes))
    return rows


def _driver_version(cp):
    """nvidia-smi's driver version, else the CUDA version the driver supports."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                              f"--id={cp.cuda.Device().id}"], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    v = cp.cuda.runtime.driverGetVersion()
    return f"CUDA {v // 1000}.{v % 1000 // 10}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results_cuda.md"))
    args = ap.parse_args(argv)
    ok, reason = cuda.available()
    if not ok:
        print(f"bench_cuda: skipped, {reason}")
        return 0
    import cupy as cp
    torch = _torch_cuda()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    cc = dev.compute_capability
    cubin = loader.cubin_for("conv1d_bn_relu", int(cc[:-1]), int(cc[-1]))
    kernels = (f"shipped cubin {cubin.name}" if cubin and not os.environ.get(
        "FUSEDRES_CUDA_FROM_SOURCE") else "compiled from csrc/cuda by CuPy's NVRTC")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# fusedres CUDA kernels on {props['name'].decode()}", "",
             f"{date}; sm_{cc}; driver {_driver_version(cp)}; kernels: {kernels}; "
             f"cupy {cp.__version__}; torch "
             f"{torch.__version__ if torch is not None else 'absent (no baseline)'}; "
             f"median of {args.reps} repetitions; batchnorm parameters float32.", "",
             "| shape (N, C, W) k | dtype | what | impl | ms | GFLOP/s | GB/s |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for shape in SHAPES:
        for dtype in DTYPES:
            for what, impl, ms, flop, nbytes in (bench_conv(shape, dtype, args.reps, torch)
                                                 + bench_add_relu(shape, dtype, args.reps, torch)):
                gflops = f"{flop / ms / 1e6:.0f}" if flop else ""
                gbs = f"{nbytes / ms / 1e6:.0f}" if nbytes else ""
                g = f" g{shape[4]}" if shape[4] > 1 else ""
                line = (f"| {shape[:3]} k{shape[3]}{g} | {np.dtype(dtype).name} | {what} | {impl} "
                        f"| {ms:.3f} | {gflops} | {gbs} |")
                print(line)
                lines.append(line)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
