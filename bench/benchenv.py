"""Imported by the benchmarks before MXNet: the threads every contender gets, and quick runs.

Threads: without OMP_NUM_THREADS, MXNet 1.9.1 runs its operators (stock MXNet's, MKLDNN's) on
half the processors, while the fused kernels and PyTorch (torch.set_num_threads in peers.py)
use all of them; the strongest stock baseline a user would deploy sets OMP_NUM_THREADS, so it
is set to every processor here. An OMP_NUM_THREADS already set is kept (and reported).

Copies: MXNet copies an array of 200000 elements or more between numpy and MXNet (mx.nd.array,
asnumpy) with an OpenMP parallel region on the calling thread, Python's main one. From then on
libgomp manages more threads than there are processors and throttles its idle threads' spin,
and every MXNet operator, stock and (source build) fused, pays a futex wake-up per parallel
region for the rest of the process: (1, 256, 2048) depthwise 1x1 s2 inference, fused 0.09 ->
0.24-0.29 ms, stock 4-D 0.32 -> 0.57-0.71 (measured, 2 processors). MXNET_CPU_PARALLEL_SIZE
above any array's size keeps those copies serial; MXNet reads it once, when it loads, so it is
set here, before MXNet is imported, unless already set (docs/mxnet-facts.md). The benchmarks
need such copies (the PyTorch peers' inputs, the checks), and a user can set it too: the
strongest stock baseline.

Quick runs: FUSEDRES_BENCH_QUICK=1 is a smoke run (3 rounds a row) whose results go to
$FUSEDRES_BENCH_OUT or /tmp/fusedres-bench-quick, never over the committed files.
"""
import datetime
import os
import platform
import time
from pathlib import Path

PRESET = os.environ.get("OMP_NUM_THREADS")
if PRESET is None:
    os.environ["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
COPY_PRESET = os.environ.get("MXNET_CPU_PARALLEL_SIZE")
if COPY_PRESET is None:
    os.environ["MXNET_CPU_PARALLEL_SIZE"] = "2000000000"  # an int in MXNet: at most 2^31 - 1

HERE = Path(__file__).resolve().parent
QUICK = os.environ.get("FUSEDRES_BENCH_QUICK", "") not in ("", "0")


def out_dir(default=HERE):
    """Where results go: $FUSEDRES_BENCH_OUT, else /tmp/fusedres-bench-quick in a quick run,
    else default."""
    return Path(os.environ.get("FUSEDRES_BENCH_OUT") or
                ("/tmp/fusedres-bench-quick" if QUICK else default))


def rounds(n):
    """n rounds, or 3 in a quick run."""
    return 3 if QUICK else n


def describe_threads():
    """How the threads and MXNet's copies were set, for the results files' headers."""
    n = os.environ["OMP_NUM_THREADS"]
    if PRESET is None:
        threads = f"OMP_NUM_THREADS={n} (set by bench/benchenv.py: every processor, for stock too)"
    else:
        threads = f"OMP_NUM_THREADS={n} (set by the caller)"
    copies = os.environ["MXNET_CPU_PARALLEL_SIZE"]
    who = "bench/benchenv.py: serial numpy<->MXNet copies" if COPY_PRESET is None else "the caller"
    return f"{threads}, MXNET_CPU_PARALLEL_SIZE={copies} (set by {who})"


ISAS = ["generic", "avx2", "avx512"]


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def sgemm_peak_gflops():
    """numpy's sgemm at 2048^3 (for reference: its BLAS may not use the widest vectors)."""
    import numpy as np
    a = np.random.rand(2048, 2048).astype(np.float32)
    b = np.random.rand(2048, 2048).astype(np.float32)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / np.median(times) / 1e9


_PEAK_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from kernel_timing import load_c
C = load_c()
own = C.cpu_isa()
isas = json.loads(sys.argv[2])
print(json.dumps([own, {i: max(C.fma_peak_gflops(i, seconds=0.3) for _ in range(3))
                        for i in isas[:isas.index(own) + 1]}]))
"""


def fma_peaks():
    """{isa: GFLOP/s} of every instruction set the kernels may run (up to fusedres._C.cpu_isa(),
    the kernels' own), best of 3 probes of 0.3 s on the kernels' threads.

    Probed in a process of its own: an OpenMP parallel region on this process's main thread
    (the probe's) leaves libgomp managing more threads than there are processors, after which
    its idle threads stop spinning early (its throttled spin) and every MXNet operator's
    parallel region pays a futex wake-up: MXNet's per-call floor went from 0.025 to 0.11-0.14 ms
    for the rest of the process (measured, 2 processors), which slowed every MXNet contender's
    small calls, fused and stock, and none of PyTorch's (docs/mxnet-facts.md)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(HERE), json.dumps(ISAS)],
                         capture_output=True, text=True, check=True, env=os.environ).stdout
    own, peaks = json.loads(out.strip().splitlines()[-1])
    return own, peaks


def best_peaks(runs):
    """{isa: the highest GFLOP/s} over several fma_peaks() runs (contention only lowers it)."""
    return {isa: max(r[isa] for r in runs) for isa in runs[0]}


def machine_header(peak_runs, own, sgemm):
    """The lines every results file starts with: machine, versions, threads, peaks (peak_runs:
    the fma_peaks() of the run's start and end)."""
    import mxnet as mx
    import peers

    from fusedres import _C
    peaks = best_peaks(peak_runs)
    peak_list = ", ".join(f"{isa} {g:.0f}" + (" (the kernels')" if isa == own else "")
                          for isa, g in peaks.items())
    runs = " / ".join(f"{r[own]:.0f}" for r in peak_runs)
    forced = os.environ.get("FUSEDRES_CPU_ISA")
    torch = peers.version()
    pytorch = ("%s (%d threads, in a process of its own: bench/peers.py)" % torch if torch
               else "not installed")
    low = min(r[own] for r in peak_runs) < 0.9 * peaks[own]
    return [
        f"Measured {datetime.date.today()} on {cpu_model()}, {os.cpu_count()} processors, "
        f"{describe_threads()}; fused kernels on {_C.kernel_threads()} threads"
        f"{f' (FUSEDRES_CPU_ISA={forced})' if forced else ''}; MXNet {mx.__version__}, "
        f"PyTorch {pytorch}, Python "
        f"{platform.python_version()}, float32.",
        "",
        f"Float32 FMA peak measured in this run (fusedres._C.fma_peak_gflops on the kernels' "
        f"threads, best of 3 probes at the start and at the end of the run; the higher is "
        f"used), GFLOP/s: {peak_list}; the kernels' ISA at the start / end: {runs}"
        + (" (**more than 10% apart: the machine was not quiet, the timings are suspect**)"
           if low else "")
        + f". numpy's sgemm (2048^3, for reference): {sgemm:.0f} GFLOP/s.",
    ]
