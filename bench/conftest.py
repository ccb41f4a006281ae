"""Collects the interleaved medians of every benchmark and writes bench/results_cpu.md and
bench/results_cpu.png at the end of the session."""
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def sgemm_peak_gflops():
    """numpy's sgemm at 2048^3, the compute ceiling the GFLOP/s are compared with."""
    a = np.random.rand(2048, 2048).astype(np.float32)
    b = np.random.rand(2048, 2048).astype(np.float32)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / np.median(times) / 1e9


class Results:
    def __init__(self):
        self.rows = []
        self.peak = None

    def add(self, group, mode, medians, work, unit):
        self.rows.append(dict(group=group, mode=mode, medians=medians, work=work, unit=unit))

    def write(self):
        if not self.rows:
            return
        import mxnet as mx
        from peers import torch
        peak = self.peak
        lines = [
            "# fusedres CPU benchmarks",
            "",
            f"Measured {datetime.date.today()} on {_cpu_model()}, {os.cpu_count()} cores "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
            f"MXNet {mx.__version__}, PyTorch {torch.__version__ if torch else 'not installed'}, "
            f"float32. `make bench` wrote this file.",
            "",
            "Each row times all contenders **interleaved** (round-robin, the same inputs), "
            "median of the rounds after warm-up. Training step = forward + backward. "
            "Stock MXNet: Conv2D(1,k) workaround for training (stock Conv1D+BatchNorm crashes "
            "in backward at these channel counts), hybridized Conv1D+BatchNorm+relu for "
            f"inference. numpy sgemm peak measured in the same run: {peak:.0f} GFLOP/s.",
            "",
            "| shape | mode | fused ms | fused CustomOp ms | stock MXNet ms | torch ms | "
            "torch folded ms | fused rate | % of sgemm peak | fused/stock | fused/torch | "
            "fused/torch folded |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            m = r["medians"]
            f = m["fused"]

            def ms(k, m=m):
                return f"{m[k] * 1e3:.3f}" if k in m else "—"

            def ratio(k, m=m, f=f):
                return f"{f / m[k]:.2f}" if k in m else "—"
            rate = r["work"] / f / 1e9
            pct = f"{100 * rate / peak:.0f}%" if r["unit"] == "GFLOP/s" else "—"
            lines.append(
                f"| {r['group']} | {r['mode']} | {ms('fused')} | {ms('fused CustomOp')} | "
                f"{ms('stock')} | {ms('torch')} | "
                f"{ms('torch folded')} | {rate:.1f} {r['unit']} | {pct} | {ratio('stock')} | "
                f"{ratio('torch')} | {ratio('torch folded')} |")
        lines += ["", "Ratios are fused time / peer time: below 1 means fused is faster. "
                  "In the training steps the input needs a gradient too, as inside a network, "
                  "for every contender. fused is what the blocks run on the CPU (the MXNet "
                  "operators); fused CustomOp is the CustomOp path (GPUs, use_native=False), "
                  "timed in the configuration rows.", ""]
        (HERE / "results_cpu.md").write_text("\n".join(lines))
        self._chart()

    def _chart(self):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        labels = [f"{r['group'].split(' (')[0]}\n{r['mode']}" for r in self.rows]
        fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 4.5))
        x = np.arange(len(labels))
        for i, peer in enumerate(["stock", "torch"]):
            vals = [r["medians"][peer] / r["medians"]["fused"] if peer in r["medians"] else 0
                    for r in self.rows]
            ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, label=f"speed-up over {peer}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylabel("peer time / fused time")
        ax.set_title("fusedres on the CPU (higher is better)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(HERE / "results_cpu.png", dpi=110)


_RESULTS = Results()


@pytest.fixture(scope="session")
def results():
    if _RESULTS.peak is None:
        _RESULTS.peak = sgemm_peak_gflops()
    return _RESULTS


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        _RESULTS.write()
