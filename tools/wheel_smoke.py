"""Checks an installed fusedres wheel (run by tools/check_wheel.sh in the wheel's venv).

1. fusedres, fusedres._C, the fusedres.cuda package and the CUDA sources/cubins come from
   site-packages, not a checkout;
2. every cubin (csrc/cuda/<name>.cu x arch) is there, is an ELF cubin, and holds the kernels
   fusedres.cuda launches;
3. OpenMP: MXNet (system libgomp) and fusedres (its vendored libiomp5) in one process, both
   multithreaded, results right; fusedres' omp_* / __kmpc_* calls bind to the vendored runtime
   even when libgomp is in the global symbol scope (LD_PRELOAD, as some launchers do); another
   libiomp5.so loaded first (FUSEDRES_FOREIGN_IOMP5) is shared rather than doubled;
4. a fork after fused ops (os.fork, subprocess) neither hangs nor breaks them, in the parent
   or the child;
5. the MXNet operator library libfusedres_mxop.so loads into MXNet and trains a step.

    python wheel_smoke.py [ARCH ...]   (the archs the wheel was built for; default: the
                                        installed fusedres/cuda/build_options.py's list)
"""
import os
import re
import subprocess
import sys
import sysconfig
import textwrap

SITE = os.path.realpath(sysconfig.get_paths()["platlib"])


def under_site(path):
    return os.path.realpath(path).startswith(SITE + os.sep)


def check(ok, msg):
    print(("  ok    " if ok else "  FAIL  ") + msg)
    if not ok:
        raise SystemExit(f"wheel_smoke: {msg}")


def locations():
    import mxnet  # noqa: F401  (first, as users do)
    import fusedres
    from fusedres import _C, cuda
    print(f"fusedres {fusedres.__version__} from {os.path.dirname(fusedres.__file__)}")
    check(under_site(fusedres.__file__), f"fusedres imported from site-packages ({SITE})")
    check(under_site(_C.__file__), f"fusedres._C is the wheel's ({os.path.basename(_C.__file__)})")
    modules = sorted(f for f in os.listdir(os.path.dirname(cuda.__file__)) if f.endswith(".py"))
    check(under_site(cuda.__file__) and os.path.basename(cuda.__file__) == "__init__.py",
          f"fusedres.cuda is the wheel's package ({', '.join(modules)})")
    check(under_site(cuda.SOURCE_DIR) and sorted(p.name for p in cuda.SOURCE_DIR.glob("*.cu"))
          == sorted(f"{k}.cu" for k in cuda.KERNELS),
          f"CUDA sources shipped in {cuda.SOURCE_DIR}")
    return cuda


def cubins(cuda, archs):
    for name, kernels in cuda.KERNELS.items():
        for arch in archs:
            path = cuda.CUBIN_DIR / f"{name}.sm_{arch}.cubin"
            data = path.read_bytes() if path.is_file() else b""
            missing = [k for k in kernels if b"\0" + k.encode() + b"\0" not in data]
            check(data[:4] == b"\x7fELF" and not missing,
                  f"{path.name}: {len(data)} bytes, {len(kernels)} entry points"
                  + (f" (missing {missing})" if missing else ""))
    # The loader picks the right one per compute capability (same major, minor <= device's).
    for cc, want in (((8, 9), "sm_86"), ((7, 0), "sm_70"), ((9, 0), "sm_90")):
        if want[3:] in archs:
            got = cuda.loader.cubin_for("conv1d_bn_relu", *cc)
            check(got is not None and want in got.name, f"sm_{cc[0]}{cc[1]} device loads {want}")


OPENMP_RUN = textwrap.dedent("""
    import os, re, sys
    import numpy as np
    import mxnet as mx
    import fusedres
    from fusedres import reference
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64, 512)); w = rng.standard_normal((64, 64, 3)) / 14
    vec = [rng.standard_normal(64), rng.uniform(0.5, 1.5, 64), rng.standard_normal(64),
           np.zeros(64), np.ones(64)]
    want, cache, _, _ = reference.conv1d_bn_relu_forward(x, w, *vec, 1, 1)
    dy = rng.standard_normal(want.shape) * (np.abs(cache["pre"]) > 1e-3)
    gref = reference.conv1d_bn_relu_backward(dy, cache)
    arrs = [mx.nd.array(a, dtype="float64") for a in [x, w] + vec]
    for a in arrs[:2]:
        a.attach_grad()
    # Stock MXNet (libgomp) and fused (libiomp5) ops interleaved, several times, in both
    # implementations (the MXNet operators' library and fusedres._C).
    err = gerr = 0.0
    for _ in range(3):
        for use_native in (True, False):
            stock = mx.nd.Convolution(arrs[0], arrs[1], arrs[2], kernel=(3,), pad=(1,),
                                      num_filter=64).asnumpy()
            with mx.autograd.record():
                y = fusedres.conv1d_bn_relu(*arrs, kernel=3, num_filter=64, pad=1,
                                            use_native=use_native)
            y.backward(mx.nd.array(dy, dtype="float64"))
            err = max(err, np.abs(y.asnumpy() - want).max() / np.abs(want).max())
            gerr = max(gerr, *(np.abs(arrs[i].grad.asnumpy() - gref[n]).max()
                               / np.abs(gref[n]).max() for i, n in ((0, "data"), (1, "weight"))))
    maps = open("/proc/self/maps").read()
    libs = sorted({os.path.basename(l.split()[-1]) for l in maps.splitlines()
                   if re.match(r"lib(g|i)?omp", os.path.basename(l.split()[-1]))})
    print(f"    OpenMP runtimes loaded: {libs}; forward error {err:.1e}, backward {gerr:.1e}")
    iomp = sorted({l.split()[-1] for l in maps.splitlines()
                   if os.path.basename(l.split()[-1]).startswith("libiomp5")})
    print(f"    libiomp5 mapped from: {iomp}")
    assert any("libgomp" in l for l in libs) and len(iomp) == 1, (libs, iomp)
    assert err < 1e-10 and gerr < 1e-10 and np.isfinite(stock).all()
""")


def openmp():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", OPENMP_RUN], env=env, capture_output=True,
                          text=True, timeout=600)
    print(proc.stdout.rstrip())
    check(proc.returncode == 0, "mxnet then fusedres in one process, 2 OpenMP threads each, "
                                "results match the reference" + ("" if proc.returncode == 0
                                                                 else "\n" + proc.stderr[-3000:]))
    # libgomp in the global scope: fusedres must still bind omp_* to its own libiomp5, since
    # mixing runtimes (libgomp's omp_get_thread_num inside a libiomp5 team) gives wrong results.
    gomp = next((p for p in ("/lib/x86_64-linux-gnu/libgomp.so.1", "/usr/lib64/libgomp.so.1",
                             "/usr/lib/x86_64-linux-gnu/libgomp.so.1") if os.path.exists(p)), None)
    if gomp is None:
        print("  skip  no system libgomp.so.1 to preload")
        return
    env.update(LD_PRELOAD=gomp, LD_DEBUG="bindings")  # the dynamic linker logs to stderr
    proc = subprocess.run([sys.executable, "-c", OPENMP_RUN], env=env, capture_output=True,
                          text=True, timeout=600)
    print(proc.stdout.rstrip())
    for lib in ("/_C.cpython", "/libfusedres_mxop.so"):
        binds = [l for l in proc.stderr.splitlines() if "binding file" in l
                 and lib in l.split(" to ")[0] and re.search(r"`(omp_|__kmpc_)", l)]
        wrong = [l.split(" to ")[1].strip() for l in binds
                 if "libiomp5" not in l.split(" to ")[1]]
        check(proc.returncode == 0 and binds and not wrong,
              f"with LD_PRELOAD=libgomp, {lib[1:]}'s {len(binds)} OpenMP symbols all bind to "
              "its libiomp5" + (f"; wrong: {wrong[:3]}" if wrong else "" if binds else
                                "; no binding seen")
              + ("" if proc.returncode == 0 else "\n" + proc.stdout[-2000:]))


def foreign_iomp5(path):
    """Another libiomp5.so loaded first (MKL's in a conda env, say) must be shared, not doubled:
    two copies of the runtime abort with "OMP: Error #15"."""
    if not path or not os.path.exists(path):
        print("  skip  no other libiomp5.so to load first")
        return
    code = f"import ctypes; ctypes.CDLL({path!r}, ctypes.RTLD_GLOBAL)\n" + OPENMP_RUN
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="2"),
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout.rstrip())
    check(proc.returncode == 0 and "Error #15" not in proc.stderr,
          f"{path} loaded first: one libiomp5 shared, no OMP Error #15"
          + ("" if proc.returncode == 0 else "\n" + proc.stderr[-2000:]))


FORK_RUN = textwrap.dedent("""
    import os, subprocess
    import mxnet as mx
    import fusedres
    b = fusedres.nn.ConvBNReLU1D(8, 3, padding=1, in_channels=4, use_native=True)
    b.initialize()
    x = mx.nd.ones((2, 4, 99))
    def step():
        with mx.autograd.record():
            y = b(x)
        y.backward()
        mx.nd.waitall()
        return float(y.sum().asscalar())
    want = step()
    same = lambda v: abs(v - want) <= 1e-4 * abs(want)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if same(step()) else 3)
    _, status = os.waitpid(pid, 0)
    # close_fds=True: Python 3.8 and 3.9 fork() here (3.10 and later vfork, which skips the
    # fork handlers).
    subprocess.run(["true"], check=True, close_fds=True)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert same(step())
    print("    forked twice; the child computed the same step; so did the parent after")
""")


def fork():
    """A fork after fused ops must neither hang nor break them in the parent or the child.
    libiomp5's fork handlers deadlocked with MXNet's, which join MXNet's worker threads
    (fusedres/__init__.py turns them off). The MXNet operators only: with CustomOps a fork can
    hang in MXNet itself, with either OpenMP runtime and any Python CustomOp (its fork handler
    takes a lock that a CustomOp thread holds while it waits for the GIL of the forking thread)."""
    try:
        proc = subprocess.run([sys.executable, "-c", FORK_RUN], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        check(False, "os.fork and subprocess after the MXNet operators ran: hung (120 s)")
    print(proc.stdout.rstrip())
    check(proc.returncode == 0, "os.fork and subprocess after the MXNet operators ran"
          + ("" if proc.returncode == 0 else "\n" + proc.stderr[-3000:]))


def native_library():
    """The MXNet operators load from the wheel into PyPI's libmxnet and train a step."""
    code = (
        "import mxnet as mx, fusedres\n"
        "from fusedres.ops import native\n"
        "ok, why = native.available()\n"
        "assert ok, why\n"
        "assert why.startswith(__import__('os').path.dirname(fusedres.__file__)), why\n"
        "b = fusedres.nn.ConvBNReLU1D(8, 3, padding=1, in_channels=4, use_native=True)\n"
        "b.initialize(); x = mx.nd.ones((2, 4, 9)); x.attach_grad()\n"
        "with mx.autograd.record(): y = b(x)\n"
        "y.backward(); mx.nd.waitall(); print('loaded', why)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    print(proc.stdout.rstrip())
    check(proc.returncode == 0, "the MXNet operators (libfusedres_mxop.so) load and train"
          + ("" if proc.returncode == 0 else "\n" + proc.stderr[-3000:]))


def main(archs):
    print("locations:")
    cuda = locations()
    archs = archs or cuda.build_options.ARCHS
    print(f"cubins (sm_{', sm_'.join(archs)}):")
    cubins(cuda, archs)
    print("OpenMP beside MXNet:")
    openmp()
    foreign_iomp5(os.environ.get("FUSEDRES_FOREIGN_IOMP5"))
    print("fork after fused ops:")
    fork()
    print("MXNet operators:")
    native_library()
    print("wheel_smoke: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1:])
