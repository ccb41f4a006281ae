"""The sweep (`make bench-sweep`): the fused Conv1D -> BatchNorm -> relu layer against stock
MXNet and PyTorch over a grid of N, C, L, K, stride, dilation and groups, in training and in
inference; writes results_sweep.json, results_sweep.md (every shape where fused is slower than
a peer, the worst ratios) and results_sweep.png (ratio against shape).

    .venv/bin/python bench/sweep.py                  # the sample: 96 shapes, 5-10 minutes
    .venv/bin/python bench/sweep.py --full           # all 540 grid points, about an hour
    .venv/bin/python bench/sweep.py --shapes 3 --reps 3 --out /tmp/sweep   # a smoke run

The grid is N {1, 8, 32} x C {16, 64, 256} x L {256, 2048} x K {1, 3, 9} x stride {1, 2} x
dilation {1, 2} x groups {1, 4, C}, C channels in and out, 'same' padding
(dilation * (K - 1) // 2); K = 1 ignores dilation, so its dilation-2 points are left out. The
sample picks, from the points whose forward convolution is at most --max-gflop, one at a time
the point whose axis values have appeared least so far (ties broken by a seeded shuffle): every
value of every axis appears about equally often.

Contenders, timed interleaved (rounds, the order permuted) on the same input values:
fused, stock MXNet (Conv2D(1,k) on data kept (N, C, 1, W) and, in inference, hybridized
Conv1D; the ratio uses the faster), PyTorch eager and, in inference, PyTorch with the BatchNorm
folded into the conv (PyTorch in a process of its own: bench/peers.py). --reps rounds (default
7) per shape and mode, each contender settling untimed (60 ms) and then timed (5 ms) in each
round (benchmarks.interleaved_times); medians of the timed calls. Every shape and mode
where fused is slower than a peer is timed again (twice the rounds) in a fresh process that
times only that shape and mode, and listed with both ratios. (The small calls of every MXNet
contender, fused and stock, used to slow down 2-5x in one long process: the numpy copies for
PyTorch's inputs (asnumpy of 200000 elements or more) ran an OpenMP team on Python's thread,
which throttles libgomp's idle threads for the rest of the process; bench/benchenv.py now
keeps those copies serial with MXNET_CPU_PARALLEL_SIZE, and the second timing is a check.)
"""
import argparse
import gc
import itertools
import json
import os
import shlex
import sys
import time
from pathlib import Path

import benchenv  # first: sets OMP_NUM_THREADS before anything imports MXNet
import mxnet as mx
import numpy as np
import peers

from fusedres import benchmarks
from fusedres.benchmarks import BenchShape

HERE = Path(__file__).resolve().parent
GRID = {"n": (1, 8, 32), "c": (16, 64, 256), "width": (256, 2048), "kernel": (1, 3, 9),
        "stride": (1, 2), "dilation": (1, 2), "groups": (1, 4, "C")}
PEERS = ("stock", "torch", "torch folded")
MODES = {"train": "training step", "infer": "inference"}

# Why fused is slower than a peer at a shape, where known: (predicate(shape, mode, peer), reason)
# pairs, the first that holds naming it; a case none explains is checked against MXNet's
# per-step floor (see floor_ms; against PyTorch only, stock pays it too), else listed as not yet
# explained.
REASONS = []


def grid_points():
    """Every distinct point of GRID as a BenchShape."""
    out = []
    for values in itertools.product(*GRID.values()):
        p = dict(zip(GRID, values))
        if p["kernel"] == 1 and p["dilation"] > 1:
            continue  # the same convolution as dilation 1
        groups = p["c"] if p["groups"] == "C" else p["groups"]
        out.append(BenchShape(
            label_of(p), p["n"], p["c"], p["width"], p["kernel"], stride=p["stride"],
            pad=p["dilation"] * (p["kernel"] - 1) // 2, dilation=p["dilation"], groups=groups))
    return out


def label_of(p):
    g = "C" if p["groups"] in ("C", p["c"]) else p["groups"]
    return (f"N{p['n']} C{p['c']} L{p['width']} k{p['kernel']} s{p['stride']} "
            f"d{p['dilation']} g{g}")


def axis_values(s):
    return {"n": s.n, "c": s.c, "width": s.width, "kernel": s.kernel, "stride": s.stride,
            "dilation": s.dilation, "groups": "C" if s.groups == s.c else s.groups}


def sample(points, count, max_gflop, seed):
    """count points of at most max_gflop, each time the one whose axis values have appeared
    least so far (ties: a seeded shuffle)."""
    rng = np.random.default_rng(seed)
    pool = [points[i] for i in rng.permutation(len(points))
            if points[i].conv_gflop <= max_gflop]
    seen = {axis: {} for axis in GRID}
    chosen = []
    while pool and len(chosen) < count:
        def score(s):
            return sum(seen[a].get(v, 0) for a, v in axis_values(s).items())
        best = min(range(len(pool)), key=lambda i: score(pool[i]))
        s = pool.pop(best)
        for a, v in axis_values(s).items():
            seen[a][v] = seen[a].get(v, 0) + 1
        chosen.append(s)
    return chosen


def contenders(shape, mode):
    x = mx.nd.random.normal(shape=(shape.n, shape.c, shape.width))
    dy = mx.nd.random.normal(shape=(shape.n, shape.out_channels, shape.out_width))
    stock = ("stock 4-D",) if mode == "train" else ("stock 4-D", "stock Conv1D")
    c = benchmarks.conv_contenders(shape, mode, x=x, dy=dy, stock=stock)
    c.update(peers.conv_contenders(shape, mode, x.asnumpy(), dy.asnumpy()))
    return c


def time_shape(shape, mode, args, scale=1):
    """{contender: [seconds of each timed call]} of one shape and mode."""
    c = contenders(shape, mode)
    times = benchmarks.interleaved_times(c, args.reps * scale, warmup=2)
    del c
    gc.collect()
    return times


def time_fresh(shape, mode, reps):
    """time_shape in a process of its own (this script's --one), which times nothing else."""
    import subprocess
    out = subprocess.run([sys.executable, __file__, "--one", shape.name, mode, "--reps",
                          str(reps)], capture_output=True, text=True, check=True,
                         env=os.environ).stdout
    return json.loads(out.strip().splitlines()[-1])


def one(label, mode, reps):
    """--one: the times of one grid point and mode, as JSON on the last line of stdout."""
    shape = next(s for s in grid_points() if s.name == label)

    class Args:
        pass
    Args.reps = reps
    print(json.dumps(time_shape(shape, mode, Args)))
    return 0


def summarize(times):
    """Medians (ms) and the fused / peer ratios of one timed shape and mode."""
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    which, stock = benchmarks.best_stock({k: v for k, v in med.items()})
    ratios = {"stock": med["fused"] / stock}
    for p in ("torch", "torch folded"):
        if p in med:
            ratios[p] = med["fused"] / med[p]
    return dict(ms=med, stock_form=which, ratios=ratios)


def floor_ms(reps=200):
    """MXNet's per-call floor, ms: {'train': a hybridized one-relu block's forward + backward
    (autograd record, backward, waitall) on 8 floats, 'infer': its forward + wait}. What any
    MXNet layer costs at least, whatever its kernels."""
    from mxnet import gluon
    net = gluon.nn.Activation("relu")
    net.hybridize()
    x = mx.nd.ones((1, 1, 8))
    x.attach_grad()
    dy = mx.nd.ones((1, 1, 8))
    c = {"train": benchmarks.training_step(net, x, dy), "infer": benchmarks.inference(net, x)}
    return {k: v * 1e3 for k, v in benchmarks.interleaved_medians(c, reps // 20).items()}


def reason_for(r, peer, floors):
    """Why fused is slower than peer in record r (see REASONS)."""
    shape = _shape_of(r)
    for predicate, why in REASONS:
        if predicate(shape, r["mode"], peer):
            return why
    peer_ms = r["ms"][r["stock_form"]] if peer == "stock" else r["ms"][peer]
    floor = floors[r["mode"]]
    # Stock MXNet pays the same floor on every call: it explains nothing against stock.
    if peer != "stock" and r["ms"]["fused"] - floor < peer_ms:
        return (f"MXNet's per-call floor: fused minus MXNet's {floor:.3f} ms floor is faster "
                "than the peer")
    return "not yet explained"


def chosen_shapes(args):
    points = grid_points()
    if args.full:
        return points, [s for s in points if s.conv_gflop <= args.max_gflop]
    return points, sample(points, args.shapes, args.max_gflop, args.seed)


def run(args):
    points, shapes = chosen_shapes(args)
    print(f"sweep: {len(shapes)} shapes x {len(MODES)} modes (of {len(points)} grid points), "
          f"writing to {args.out}", flush=True)
    records, failed, t_start = [], [], time.perf_counter()
    for i, s in enumerate(shapes):
        for mode in MODES:
            rec = dict(shape=axis_values(s), label=s.name, mode=mode,
                       gflop=s.conv_gflop * (3 if mode == "train" else 1))
            try:
                first = summarize(time_shape(s, mode, args))
            except mx.MXNetError as e:  # one contender failed: recorded, the sweep goes on
                mx.nd.waitall()
                failed.append(dict(rec, error=str(e).strip().splitlines()[-1]))
                print(f"[{i + 1}/{len(shapes)}] {s.name:<32} {mode:<5} FAILED: "
                      f"{failed[-1]['error']}", flush=True)
                continue
            rec.update(first)
            if args.confirm and max(first["ratios"].values()) > 1:
                # Slower than a peer: timed again in a fresh process, with twice the rounds;
                # the second timing is the row's (the first is kept as "first").
                rec.update(summarize(time_fresh(s, mode, args.reps * 2)), first=first)
            records.append(rec)
            peer, ratio = max(rec["ratios"].items(), key=lambda kv: kv[1])
            again = f" (first: {first['ratios'][peer]:.2f})" if "first" in rec else ""
            print(f"[{i + 1}/{len(shapes)}] {s.name:<32} {mode:<5} fused "
                  f"{rec['ms']['fused']:8.3f} ms, worst fused/{peer} {ratio:.2f}{again}",
                  flush=True)
    return shapes, records, failed, time.perf_counter() - t_start


def slower_cases(records):
    """[(record, peer, ratio, first ratio or None)] where fused is slower than peer (in both
    timings where there were two), the highest ratio first."""
    out = []
    for r in records:
        for p, ratio in r["ratios"].items():
            first = r["first"]["ratios"].get(p) if "first" in r else None
            if ratio > 1 and (first is None or first > 1):
                out.append((r, p, ratio, first))
    return sorted(out, key=lambda c: -c[2])


def _shape_of(r):
    a = r["shape"]
    groups = a["c"] if a["groups"] == "C" else a["groups"]
    return BenchShape(r["label"], a["n"], a["c"], a["width"], a["kernel"], a["stride"],
                      a["dilation"] * (a["kernel"] - 1) // 2, a["dilation"], groups)


def write_md(path, args, shapes, records, failed, seconds, header, peak, floors):
    slow = slower_cases(records)
    lines = ["# fusedres sweep: fused against stock MXNet and PyTorch over a shape grid", ""]
    lines += header
    lines += ["", f"Command: `{shlex.join(['python'] + sys.argv)}` (`make bench-sweep`); "
              f"{len(shapes)} shapes x 2 modes in {seconds / 60:.1f} min. "
              + ("All the grid points" if args.full else
                 f"A sample of the grid (seed {args.seed})")
              + f" with a forward convolution of at most {args.max_gflop:g} GFLOP: "
              + coverage(shapes) + ".",
              "",
              "The grid, the sampling, the contenders and the timing: bench/sweep.py's "
              "docstring. Ratios are fused time / peer time (below 1: fused is faster); "
              "`stock` is the faster of Conv2D(1,k) on data kept 4-D and (inference) Conv1D; "
              "`torch folded` is inference only. Training steps count 3 convolutions of work "
              "(the input needs a gradient). MXNet's per-call floor measured in this run (a "
              "hybridized one-relu block on 8 floats): training step "
              f"{floors['train']:.3f} ms, inference {floors['infer']:.3f} ms.", ""]
    lines += ["## Summary", "",
              "| mode | peer | shapes | median ratio | worst ratio | shapes where fused is "
              "slower |", "|---|---|---|---|---|---|"]
    for mode in MODES:
        for p in PEERS:
            rs = [(r["ratios"][p], r) for r in records if r["mode"] == mode and p in r["ratios"]]
            if not rs:
                continue
            worst = max(rs, key=lambda t: t[0])
            n_slow = sum(1 for c in slow if c[0]["mode"] == mode and c[1] == p)
            lines.append(f"| {MODES[mode]} | {p} | {len(rs)} | "
                         f"{np.median([t[0] for t in rs]):.2f} | {worst[0]:.2f} "
                         f"({worst[1]['label']}) | {n_slow} |")
    lines += ["", "## Every shape where fused is slower than a peer", ""]
    if not slow:
        lines.append("None: fused is at least as fast as every peer at every shape timed.")
    else:
        lines += [f"{len(slow)} (shape, mode, peer) cases"
                  + (", slower in the first timing and again in the second (twice the rounds, in "
                     "a fresh process that times only that shape and mode; its ratio is the "
                     "row's):" if args.confirm else " (not timed again):"),
                  "", "| shape | mode | peer | fused ms | peer ms | ratio | first ratio | "
                  "reason |", "|---|---|---|---|---|---|---|---|"]
        for r, p, ratio, first in slow:
            peer_ms = r["ms"][r["stock_form"]] if p == "stock" else r["ms"][p]
            name = f"stock ({r['stock_form'][len('stock '):]})" if p == "stock" else p
            lines.append(f"| {r['label']} | {MODES[r['mode']]} | {name} | "
                         f"{r['ms']['fused']:.3f} | {peer_ms:.3f} | {ratio:.2f} | "
                         f"{'%.2f' % first if first is not None else '—'} | "
                         f"{reason_for(r, p, floors)} |")
    if failed:
        lines += ["", "## Shapes that failed", "", "| shape | mode | error |", "|---|---|---|"]
        lines += [f"| {f['label']} | {MODES[f['mode']]} | {f['error']} |" for f in failed]
    lines += ["", "## The worst ratios", "",
              f"The {min(args.worst, len(records))} (shape, mode) rows with the highest fused / "
              "peer ratio:", ""]
    lines += _table(sorted(records, key=lambda r: -max(r["ratios"].values()))[:args.worst],
                    peak)
    lines += ["", "<details><summary>All rows</summary>", ""]
    lines += _table(records, peak)
    lines += ["", "</details>", ""]
    path.write_text("\n".join(lines))


def coverage(shapes):
    """How often each axis value appears in shapes, e.g. 'n 1: 32, 8: 32, 32: 32; ...'."""
    parts = []
    for a, values in GRID.items():
        counts = [sum(1 for s in shapes if axis_values(s)[a] == v) for v in values]
        parts.append(f"{a} " + ", ".join(f"{v}: {n}" for v, n in zip(values, counts)))
    return "; ".join(parts)


def _table(rows, peak):
    head = ["shape", "mode", "GFLOP", "fused ms", "stock 4-D ms", "stock Conv1D ms",
            "torch ms", "torch folded ms", "fused/stock", "fused/torch", "fused/torch folded",
            "fused % of FMA peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ms = r["ms"]

        def cell(k, ms=ms):
            return f"{ms[k]:.3f}" if k in ms else "—"

        def ratio(p, r=r):
            return f"{r['ratios'][p]:.2f}" if p in r["ratios"] else "—"
        pct = 100 * r["gflop"] / (ms["fused"] / 1e3) / peak
        lines.append("| " + " | ".join([
            r["label"], MODES[r["mode"]], f"{r['gflop']:.3g}", cell("fused"), cell("stock 4-D"),
            cell("stock Conv1D"), cell("torch"), cell("torch folded"),
            ratio("stock") + (f" ({r['stock_form'][len('stock '):]})"),
            ratio("torch"), ratio("torch folded"), f"{pct:.2g}%"]) + " |")
    return lines


def chart(path, records):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    markers = {"stock": ("o", "tab:blue"), "torch": ("s", "tab:orange"),
               "torch folded": ("^", "tab:green")}
    for ax, mode in zip(axes, MODES):
        rows = [r for r in records if r["mode"] == mode]
        for p, (mk, color) in markers.items():
            pts = [(r["gflop"], r["ratios"][p]) for r in rows if p in r["ratios"]]
            if pts:
                ax.scatter(*zip(*pts), marker=mk, s=18, color=color, alpha=0.75,
                           label=f"fused / {p}")
        worst = sorted(((max(r["ratios"].values()), r) for r in rows), key=lambda t: -t[0])
        for ratio, r in worst[:3]:
            if ratio > 1:
                ax.annotate(r["label"], (r["gflop"], ratio), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("work of the shape (GFLOP)")
        ax.set_title(f"{MODES[mode]}: {len(rows)} shapes")
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    axes[0].set_ylabel("fused time / peer time (below 1: fused is faster)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("fusedres sweep on the CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=int, default=96, help="sample size (default 96)")
    ap.add_argument("--full", action="store_true", help="every grid point (of --max-gflop)")
    ap.add_argument("--max-gflop", type=float, default=None,
                    help="largest forward convolution (default 1.0; --full: no limit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=7, help="rounds per shape and mode (default 7)")
    ap.add_argument("--no-confirm", dest="confirm", action="store_false",
                    help="do not time again the shapes where fused is slower")
    ap.add_argument("--worst", type=int, default=20, help="rows in the worst-ratios table")
    ap.add_argument("--one", nargs=2, metavar=("SHAPE", "MODE"),
                    help="time one grid point (its label) and mode; print the times as JSON")
    ap.add_argument("--list", action="store_true",
                    help="print the shapes and how often each axis value appears; time nothing")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory of the results (default bench/; for fewer than 20 shapes "
                         "or --reps under 5, a smoke run: /tmp/fusedres-sweep-quick)")
    args = ap.parse_args(argv)
    if args.max_gflop is None:
        args.max_gflop = float("inf") if args.full else 1.0
    if args.out is None:
        smoke = benchenv.QUICK or (not args.full and args.shapes < 20) or args.reps < 5
        args.out = Path("/tmp/fusedres-sweep-quick") if smoke else HERE
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.one:
        return one(args.one[0], args.one[1], args.reps)
    if args.list:
        points, shapes = chosen_shapes(args)
        for s in shapes:
            print(f"{s.name:<32} {s.conv_gflop:9.4f} GFLOP forward")
        print(f"{len(shapes)} of {len(points)} grid points; {coverage(shapes)}")
        return 0
    own, start = benchenv.fma_peaks()
    sgemm = benchenv.sgemm_peak_gflops()
    floors = floor_ms()
    shapes, records, failed, seconds = run(args)
    peak_runs = [start, benchenv.fma_peaks()[1]]
    peaks = benchenv.best_peaks(peak_runs)
    header = benchenv.machine_header(peak_runs, own, sgemm)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(command=sys.argv, seconds=seconds, fma_peaks=peaks, fma_peak_runs=peak_runs,
                kernels_isa=own,
                sgemm_gflops=sgemm, header=header, grid=GRID, seed=args.seed,
                full=args.full, max_gflop=args.max_gflop, omp=os.environ["OMP_NUM_THREADS"],
                mxnet_floor_ms=floors)
    (args.out / "results_sweep.json").write_text(json.dumps(
        dict(meta=meta, records=records, failed=failed), indent=1, default=str))
    write_md(args.out / "results_sweep.md", args, shapes, records, failed, seconds, header,
             peaks[own], floors)
    chart(args.out / "results_sweep.png", records)
    n_slow = len(slower_cases(records))
    print(f"{len(records)} rows in {seconds / 60:.1f} min ({len(failed)} failed); fused slower "
          f"than a peer in {n_slow} (shape, mode, peer) cases; wrote "
          f"{args.out}/results_sweep.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
