"""Collects the interleaved medians of every benchmark and writes results_cpu.md and
results_cpu.png at the end of the session (in bench/; see benchenv.py for quick runs)."""
import shlex
import sys

import benchenv  # first: sets OMP_NUM_THREADS before anything imports MXNet
import numpy as np
import pytest
from benchenv import QUICK, best_peaks, fma_peaks, machine_header, sgemm_peak_gflops

OUT = benchenv.out_dir()

# Column order of the contenders in every table.
CONTENDERS = ["fused", "fused CustomOp", "stock 4-D", "stock expand_dims", "stock Conv1D",
              "stock", "torch", "torch folded"]


def _ms(m, k):
    return f"{m[k] * 1e3:.3f}" if k in m else "—"


def _best(m, prefix):
    """(name, seconds) of the fastest contender whose name starts with prefix, or None."""
    found = {k: v for k, v in m.items() if k.startswith(prefix)}
    if not found:
        return None
    k = min(found, key=found.get)
    return k, found[k]


def _percent(fraction):
    p = 100 * fraction
    return f"{p:.0f}%" if p >= 10 else f"{p:.2g}%"


class Results:
    """Rows by section; each section becomes one table, its columns the contenders it has."""

    SECTIONS = {
        "layers": "Conv1D -> BatchNorm -> relu layers (the shared table, "
                  "fusedres.benchmarks.SHAPES)",
        "models": "Whole model: a 1-D ResNet-18 (fusedres.benchmarks.MODEL)",
        "model_layers": "The model's conv layers (+ BatchNorm + relu), each alone (xN: N of "
                        "the model's convs have that shape; the stem's input needs no gradient "
                        "inside the model, here it does)",
        "configurations": "Training-step configurations (tiny shape: the per-call cost)",
        "add_relu": "add+relu",
    }

    def __init__(self):
        self.rows = {k: [] for k in self.SECTIONS}
        self.inside = {}  # title: (lines before the table, table head, rows)
        self.peak_runs, self.own_isa, self.sgemm = [], None, None

    @property
    def peak(self):
        return best_peaks(self.peak_runs)[self.own_isa]

    def add(self, group, mode, medians, work, unit, section="layers"):
        self.rows[section].append(dict(group=group, mode=mode, medians=medians, work=work,
                                       unit=unit))

    def add_inside(self, title, intro, head, row):
        """A row of a table in the 'Inside a network' section; head: the column names."""
        entry = self.inside.setdefault(title, (intro, head, []))
        entry[2].append("| " + " | ".join(row) + " |")

    def _table(self, rows):
        present = [k for k in CONTENDERS if any(k in r["medians"] for r in rows)]
        stock = any(k.startswith("stock") for k in present)
        peers = (["stock"] if stock else []) + [k for k in ("torch", "torch folded")
                                                 if k in present]
        flop = rows[0]["unit"] == "GFLOP/s"
        head = (["shape", "mode"] + [f"{k} ms" for k in present] +
                [f"fused/{p}" for p in peers] + ["fused rate"] +
                (["% of FMA peak: fused / stock / torch"] if flop else []))
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            m = r["medians"]
            f = m["fused"]
            cells = [r["group"], r["mode"]] + [_ms(m, k) for k in present]
            for p in peers:
                if p == "stock":
                    name, t = _best(m, "stock")
                    which = f" ({name[len('stock '):]})" if name != "stock" else ""
                    cells.append(f"{f / t:.2f}{which}")
                else:
                    cells.append(f"{f / m[p]:.2f}" if p in m else "—")
            rate = r["work"] / f / 1e9
            cells.append(f"{rate:.1f} {r['unit']}")
            if flop:
                pct = [_percent(r["work"] / 1e9 / b[1] / self.peak) if b else "—"
                       for b in (("fused", f), _best(m, "stock"), _best(m, "torch"))]
                cells.append(" / ".join(pct))
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def write(self):
        if not any(self.rows.values()) and not self.inside:
            return
        from fusedres import benchmarks
        lines = ["# fusedres CPU benchmarks", ""]
        self.peak_runs.append(fma_peaks()[1])  # the end of the run
        lines += machine_header(self.peak_runs, self.own_isa, self.sgemm)
        lines += [
            "",
            f"Command: `{shlex.join(['pytest'] + sys.argv[1:])}` (`make bench`)"
            f"{'; QUICK smoke run (3 rounds a row): not results' if QUICK else ''}.",
            "",
            "Each row times all contenders **interleaved** on the same input values: rounds in "
            "which every contender runs, in an order that changes from round to round (seeded "
            "permutations: each contender follows every other alike); in each round a "
            "contender first "
            f"runs untimed for {benchmarks.SETTLE_S * 1e3:g} ms (at least once: whatever the "
            "previous one left behind, such as threads still spinning, is spent there), then "
            f"timed for {benchmarks.BLOCK_S * 1e3:g} ms (at least once); "
            "medians of the timed calls (fusedres.benchmarks.interleaved_times). PyTorch runs in "
            "a process of its own (in the same process it slows MXNet's operators down by up to "
            "100x: bench/peers.py). Ratios are fused time / "
            "peer time: below 1 means fused is faster. Stock MXNet is timed in every form that "
            "works and fused/stock uses the fastest one measured (named in brackets): "
            "`stock 4-D` is Conv2D(1,k)+BatchNorm+relu on data kept (N, C, 1, W) through the "
            "network (created 4-D, no reshape per layer), `stock expand_dims` the per-layer "
            "expand_dims -> Conv2D(1,k) -> BatchNorm -> relu -> squeeze workaround (training), "
            "`stock Conv1D` hybridized Conv1D+BatchNorm+relu (inference; its backward crashes "
            "with MKLDNN at these channel counts, docs/mxnet-facts.md). PyTorch: eager, "
            "`torch folded` with each BatchNorm folded into its conv (inference).",
            "",
            "Training step = forward + backward; a layer's input needs a gradient too (as inside "
            "a network), so a training row counts three convolutions of work (forward, data "
            "gradient, weight gradient); the model's input needs none (its stem counts two). "
            f"`% of FMA peak` is each contender's rate against the kernels' FMA peak "
            f"({self.own_isa}, {self.peak:.0f} GFLOP/s) measured in this run: fused / the "
            "fastest stock / the faster of torch and torch folded.",
        ]
        for key, title in self.SECTIONS.items():
            if self.rows[key]:
                lines += ["", f"## {title}", ""] + self._table(self.rows[key])
        if self.inside:
            lines += ["", "## Inside a network"]
            for title, (intro, head, rows) in self.inside.items():
                lines += ["", f"### {title}", "", intro, "", "| " + " | ".join(head) + " |",
                          "|" + "---|" * len(head)] + rows
        lines += ["", "fused is what the blocks run on the CPU (the MXNet operators); "
                  "fused CustomOp is the CustomOp path (GPUs, use_native=False), timed in the "
                  "configuration rows.", ""]
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "results_cpu.md").write_text("\n".join(lines))
        self._chart()

    def _chart(self):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rows = self.rows["layers"] + self.rows["models"]
        if not rows:
            return
        labels = [f"{r['group'].split(' (')[0]}\n{r['mode']}" for r in rows]
        fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.7), 4.5))
        x = np.arange(len(labels))
        for i, peer in enumerate(["stock", "torch"]):
            vals = []
            for r in rows:
                b = _best(r["medians"], peer)
                vals.append(b[1] / r["medians"]["fused"] if b else 0)
            ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, label=f"speed-up over the fastest {peer}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylabel("peer time / fused time")
        ax.set_title("fusedres on the CPU (higher is better)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "results_cpu.png", dpi=110)


_RESULTS = Results()


@pytest.fixture(scope="session")
def results():
    if not _RESULTS.peak_runs:
        _RESULTS.own_isa, start = fma_peaks()
        _RESULTS.peak_runs.append(start)
        _RESULTS.sgemm = sgemm_peak_gflops()
    return _RESULTS


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        _RESULTS.write()
