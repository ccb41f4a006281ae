"""Does the timing protocol measure each contender as it runs alone? For a few shapes, the
median of every contender timed alone (only it, in this process or PyTorch's) against the same
contender timed interleaved with the others (fusedres.benchmarks.interleaved_times, as the
results files are made). On a quiet machine the two agree within noise; a contender much
slower interleaved is being slowed by another one (threads spinning, shared runtimes).

    .venv/bin/python bench/interleaving_check.py [--reps 7] [--shapes tiny,batch1,reference]
"""
import argparse
import sys

import benchenv  # noqa: F401  (first: sets OMP_NUM_THREADS before MXNet)
import mxnet as mx
import numpy as np
import peers

from fusedres import benchmarks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", default="tiny,batch1,reference")
    args = ap.parse_args(argv)
    worst = 1.0
    print(f"{'shape':<30}{'mode':<7}{'contender':<20}{'alone ms':>10}{'interleaved':>12}"
          f"{'ratio':>7}")
    for name in args.shapes.split(","):
        s = benchmarks.shape_named(name)
        for mode in ("train", "infer"):
            x = mx.nd.random.normal(shape=(s.n, s.c, s.width))
            dy = mx.nd.random.normal(shape=(s.n, s.out_channels, s.out_width))
            c = benchmarks.conv_contenders(s, mode, x=x, dy=dy)
            c.update(peers.conv_contenders(s, mode, x.asnumpy(), dy.asnumpy()))
            inter = {k: float(np.median(v)) * 1e3
                     for k, v in benchmarks.interleaved_times(c, args.reps).items()}
            for k, fn in c.items():
                alone = float(np.median(benchmarks.interleaved_times({k: fn}, args.reps)[k])) * 1e3
                worst = max(worst, inter[k] / alone)
                print(f"{s.label:<30}{mode:<7}{k:<20}{alone:>10.3f}{inter[k]:>12.3f}"
                      f"{inter[k] / alone:>7.2f}", flush=True)
    print(f"worst interleaved / alone: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
