"""Times the fusedres._C CPU kernels (and PyTorch eager, when importable) at the shapes we care
about. Median of many repetitions after warm-up; kernels and torch are interleaved per round
so that machine noise hits both alike.

    OMP_NUM_THREADS=2 .venv/bin/python bench/kernel_timing.py [--reps 30] [--shapes ref,k5]
                                                               [--dtype float32] [--no-torch]
"""
import argparse
import glob
import importlib.machinery
import importlib.util
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# name: (N, Cin, L, Cout, K, stride, pad, dilate, num_group)
SHAPES = {
    "ref": (32, 64, 1024, 64, 3, 1, 1, 1, 1),
    "k5": (8, 256, 512, 256, 5, 1, 2, 1, 1),
    "s2": (64, 32, 4096, 32, 3, 2, 1, 1, 1),
    "k1": (16, 128, 256, 128, 1, 1, 0, 1, 1),
    "d2": (4, 64, 16000, 64, 9, 1, 4, 2, 1),
    "tiny": (2, 8, 16, 8, 3, 1, 1, 1, 1),
    "g2": (32, 64, 1024, 64, 3, 1, 1, 1, 2),
    # the 1-D ResNet-18's strided layers (fusedres.benchmarks.MODEL)
    "m3s2a": (16, 64, 256, 128, 3, 2, 1, 1, 1),
    "m3s2b": (16, 128, 128, 256, 3, 2, 1, 1, 1),
    "m3s2c": (16, 256, 64, 512, 3, 2, 1, 1, 1),
    "m1s2a": (16, 64, 256, 128, 1, 2, 0, 1, 1),
    "m1s2b": (16, 128, 128, 256, 1, 2, 0, 1, 1),
    "m1s2c": (16, 256, 64, 512, 1, 2, 0, 1, 1),
    "m512": (16, 512, 32, 512, 3, 1, 1, 1, 1),
    # the sweep's slowest training row against stock (bench/results_sweep.md)
    "c16k9": (32, 16, 2048, 16, 9, 1, 4, 1, 1),
    # the sweep's rows slower than PyTorch (bench/results_sweep.md)
    "g4k9": (32, 64, 256, 64, 9, 1, 8, 2, 4),
    "dwk1s2": (1, 256, 2048, 256, 1, 2, 0, 1, 256),
    # the sweep's training row closest to stock (bench/results_sweep.md)
    "n1c256": (1, 256, 256, 256, 3, 1, 1, 1, 1),
}


def load_c():
    so = [p for sfx in importlib.machinery.EXTENSION_SUFFIXES
          for p in sorted(glob.glob(str(ROOT / "fusedres" / ("_C" + sfx))))]
    spec = importlib.util.spec_from_file_location("fusedres._C", so[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lout_of(L, K, s, p, d):
    return (L + 2 * p - d * (K - 1) - 1) // s + 1


class Kernels:
    def __init__(self, C, shape, dtype):
        N, Ci, L, Co, K, s, p, d, g = shape
        rng = np.random.default_rng(0)
        Lo = lout_of(L, K, s, p, d)
        f = lambda *sh: np.ascontiguousarray(rng.standard_normal(sh), dtype=dtype)
        self.C, self.hp = C, (s, p, d, g)
        self.x, self.w, self.b = f(N, Ci, L), f(Co, Ci // g, K) * 0.1, f(Co)
        self.gamma, self.beta = np.ones(Co, dtype), np.zeros(Co, dtype)
        self.rm, self.rv = np.zeros(Co, dtype), np.ones(Co, dtype)
        self.z, self.y, self.yi = (np.empty((N, Co, Lo), dtype) for _ in range(3))
        self.mean, self.invstd = np.empty(Co, dtype), np.empty(Co, dtype)
        self.dy = f(N, Co, Lo)
        self.dx, self.dw = np.empty_like(self.x), np.empty_like(self.w)
        self.db, self.dg, self.dbeta = (np.empty(Co, dtype) for _ in range(3))

    def fwd(self):
        self.C.conv1d_bn_relu_forward_train(self.x, self.w, self.b, self.gamma, self.beta, self.rm,
                                            self.rv, self.z, self.mean, self.invstd, self.y,
                                            *self.hp, 1e-5, 0.9, True)

    def bwd(self):
        self.C.conv1d_bn_relu_backward(self.dy, self.x, self.w, self.z, self.gamma, self.beta,
                                       self.mean, self.invstd, self.dx, self.dw, self.db, self.dg,
                                       self.dbeta, *self.hp, True)

    def infer(self):
        self.C.conv1d_bn_relu_forward_infer(self.x, self.w, self.b, self.gamma, self.beta,
                                            self.rm, self.rv, self.yi, *self.hp, 1e-5)


class Torch:
    def __init__(self, torch, shape, dtype):
        N, Ci, L, Co, K, s, p, d, g = shape
        self.torch = torch
        td = getattr(torch, np.dtype(dtype).name)
        self.conv = torch.nn.Conv1d(Ci, Co, K, s, p, d, g).to(td)
        self.bn = torch.nn.BatchNorm1d(Co).to(td)
        self.x = torch.randn(N, Ci, L, dtype=td, requires_grad=True)
        Lo = lout_of(L, K, s, p, d)
        self.dy = torch.randn(N, Co, Lo, dtype=td)
        self.folded = torch.nn.Conv1d(Ci, Co, K, s, p, d, g).to(td).eval()
        self.xi = self.x.detach().clone()
        self.out = None

    def fwd(self):
        self.out = self.torch.relu(self.bn(self.conv(self.x)))

    def bwd(self):
        self.out.backward(self.dy)
        self.x.grad = None
        self.conv.zero_grad(set_to_none=True)
        self.bn.zero_grad(set_to_none=True)

    def infer(self):
        with self.torch.inference_mode():
            self.torch.relu(self.folded(self.xi))


def timeit(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_shape(name, shape, C, torch, reps, dtype):
    N, Ci, L, Co, K, s, p, d, g = shape
    Lo = lout_of(L, K, s, p, d)
    flop = 2.0 * N * Co * Lo * (Ci // g) * K
    k = Kernels(C, shape, dtype)
    t = Torch(torch, shape, dtype) if torch is not None else None
    res = {key: [] for key in ("fwd", "bwd", "infer", "t_fwd", "t_bwd", "t_infer")}
    for i in range(reps + 3):
        row = {"fwd": timeit(k.fwd), "bwd": timeit(k.bwd), "infer": timeit(k.infer)}
        if t is not None:
            row.update(t_fwd=timeit(t.fwd), t_bwd=timeit(t.bwd), t_infer=timeit(t.infer))
        if i >= 3:
            for key, v in row.items():
                res[key].append(v)
    med = {key: 1e3 * float(np.median(v)) for key, v in res.items() if v}
    gf = lambda ms, mult: mult * flop / (ms * 1e-3) / 1e9
    line = (f"{name:5s} {str(shape[:5]) + ' s%d p%d d%d g%d' % (s, p, d, g):42s} "
            f"fwd {med['fwd']:7.3f} ms ({gf(med['fwd'], 1):5.1f} GF/s)  "
            f"bwd {med['bwd']:7.3f} ({gf(med['bwd'], 2):5.1f})  "
            f"train {med['fwd'] + med['bwd']:7.3f}  "
            f"infer {med['infer']:7.3f} ({gf(med['infer'], 1):5.1f})")
    if t is not None:
        line += (f"\n{'':48s}torch fwd {med['t_fwd']:7.3f} bwd {med['t_bwd']:7.3f} "
                 f"train {med['t_fwd'] + med['t_bwd']:7.3f} infer(folded) {med['t_infer']:7.3f}"
                 f"   ratio train {(med['fwd'] + med['bwd']) / (med['t_fwd'] + med['t_bwd']):.2f}"
                 f" infer {med['infer'] / med['t_infer']:.2f}")
    print(line, flush=True)
    return med


def bench_add_relu(C, torch, reps, dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((32, 64, 1024)).astype(dtype)
    b = rng.standard_normal(a.shape).astype(dtype)
    y, dy = np.empty_like(a), rng.standard_normal(a.shape).astype(dtype)
    ga, gb = np.empty_like(a), np.empty_like(a)
    f = [timeit(lambda: C.add_relu_forward(a, b, y)) for _ in range(reps + 3)][3:]
    bw = [timeit(lambda: C.add_relu_backward(dy, y, ga, gb)) for _ in range(reps + 3)][3:]
    line = (f"add_relu (32,64,1024): fwd {1e3 * np.median(f):.3f} ms  "
            f"bwd(both) {1e3 * np.median(bw):.3f} ms")
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tf = [timeit(lambda: torch.relu(ta + tb)) for _ in range(reps + 3)][3:]
        line += f"   torch fwd {1e3 * np.median(tf):.3f} ms"
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    C = load_c()
    torch = None
    if not args.no_torch:
        try:
            import torch as _torch
            _torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
            torch = _torch
        except ImportError:
            pass
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"isa={os.environ.get('FUSEDRES_CPU_ISA', 'auto')}"
          f" dtype={args.dtype} torch={'%s' % torch.__version__ if torch else 'none'}", flush=True)
    for name in args.shapes.split(","):
        bench_shape(name, SHAPES[name], C, torch, args.reps, np.dtype(args.dtype))
    bench_add_relu(C, torch, args.reps, np.dtype(args.dtype))


if __name__ == "__main__":
    main()
