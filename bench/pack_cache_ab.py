"""A/B of the inference forward's packed-weight cache (csrc/cpu/pack_cache.h) in one process:
each round times one call after dropping the cache (packs, as before the cache) and one call
from the cache, on bench/kernel_timing.py's shapes; medians.

    OMP_NUM_THREADS=2 .venv/bin/python bench/pack_cache_ab.py [m512,m3s2c,ref ...]
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_timing import SHAPES, Kernels, load_c  # noqa: E402


def main(names):
    C = load_c()
    for name in names:
        k = Kernels(C, SHAPES[name], np.float32)
        packed, cached = [], []
        for _ in range(80):
            C.pack_cache_clear()
            t = time.perf_counter()
            k.infer()
            packed.append(time.perf_counter() - t)
            k.infer()  # the second sighting of the weights stores them
            t = time.perf_counter()
            k.infer()
            cached.append(time.perf_counter() - t)
        a, b = np.median(packed[5:]), np.median(cached[5:])
        print(f"{name:6s} {str(SHAPES[name][:6]):34s} packing {1e3 * a:7.3f} ms   "
              f"cached {1e3 * b:7.3f} ms   ratio {b / a:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else
         ["ref", "k1", "m3s2b", "m3s2c", "m1s2c", "m512", "tiny"])
