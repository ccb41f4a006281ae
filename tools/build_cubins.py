"""Compile every csrc/cuda/*.cu to fusedres/cubins/<name>.sm_XX.cubin with NVRTC 11.8.

Needs neither a GPU nor nvcc: NVRTC comes from PyPI (requirements-cuda-build.txt) and is
called through ctypes. CUDA 11.8 cubins load on every driver from the CUDA 11 era on, and
sm_70 (V100) is still a target, which the machine's nvcc 13 cannot emit.

    python tools/build_cubins.py [--src DIR] [--out DIR] [--arch SM ...] [--verbose]
    python tools/build_cubins.py --print-archs     # the default arch list, for shell scripts

The options and the default archs are fusedres/cuda/build_options.py's, loaded by path: this
script runs in build environments without MXNet, where fusedres cannot be imported. Exits
nonzero, printing the NVRTC log, if any file fails to compile for any arch.
"""
import argparse
import ctypes
import importlib.util
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC_DIR = ROOT / "csrc" / "cuda"
OUT_DIR = ROOT / "fusedres" / "cubins"


def _load_build_options():
    path = ROOT / "fusedres" / "cuda" / "build_options.py"
    spec = importlib.util.spec_from_file_location("fusedres_cuda_build_options", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_options = _load_build_options()
ARCHS, NVRTC_OPTIONS = _options.ARCHS, _options.NVRTC_OPTIONS


class NvrtcError(RuntimeError):
    pass


def _package_dir(module):
    """Directory of an nvidia-* wheel's namespace subpackage, or None if not installed."""
    try:
        mod = __import__(module, fromlist=["_"])
    except ImportError:
        return None
    paths = list(getattr(mod, "__path__", []))
    return Path(paths[0]) if paths else None


def find_nvrtc():
    """(libnvrtc path, builtins path, runtime include dir or None); raises FileNotFoundError."""
    nvrtc = _package_dir("nvidia.cuda_nvrtc")
    if nvrtc is None:
        raise FileNotFoundError("nvidia-cuda-nvrtc-cu11 is not installed "
                                "(pip install -r requirements-cuda-build.txt)")
    libs = sorted((nvrtc / "lib").glob("libnvrtc.so*"))
    builtins = sorted((nvrtc / "lib").glob("libnvrtc-builtins.so*"))
    if not libs or not builtins:
        raise FileNotFoundError(f"no libnvrtc.so / libnvrtc-builtins.so under {nvrtc / 'lib'}")
    runtime = _package_dir("nvidia.cuda_runtime")
    include = runtime / "include" if runtime and (runtime / "include").is_dir() else None
    return libs[0], builtins[0], include


class Nvrtc:
    """The few NVRTC entry points needed to turn one source into one cubin."""

    def __init__(self, lib_path, builtins_path):
        # libnvrtc dlopens its builtins by soname; loading them first, globally, lets it find
        # them without LD_LIBRARY_PATH.
        ctypes.CDLL(str(builtins_path), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(lib_path))
        c_p, c_pp, c_sz = ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t
        self._sig(lib.nvrtcGetErrorString, [ctypes.c_int], ctypes.c_char_p)
        self._sig(lib.nvrtcVersion, [ctypes.POINTER(ctypes.c_int)] * 2)
        self._sig(lib.nvrtcCreateProgram, [ctypes.POINTER(c_p), ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.c_int, c_pp, c_pp])
        self._sig(lib.nvrtcDestroyProgram, [ctypes.POINTER(c_p)])
        self._sig(lib.nvrtcCompileProgram, [c_p, ctypes.c_int, c_pp])
        self._sig(lib.nvrtcGetProgramLogSize, [c_p, ctypes.POINTER(c_sz)])
        self._sig(lib.nvrtcGetProgramLog, [c_p, ctypes.c_char_p])
        self._sig(lib.nvrtcGetCUBINSize, [c_p, ctypes.POINTER(c_sz)])
        self._sig(lib.nvrtcGetCUBIN, [c_p, ctypes.c_char_p])
        self.lib = lib

    @staticmethod
    def _sig(fn, argtypes, restype=ctypes.c_int):
        fn.argtypes, fn.restype = argtypes, restype

    def _check(self, status, what):
        if status != 0:
            raise NvrtcError(f"{what}: {self.lib.nvrtcGetErrorString(status).decode()}")

    def version(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def compile(self, source, name, options):
        """Returns (cubin bytes, log); raises NvrtcError carrying the log on failure."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(),
                                                name.encode(), 0, None, None),
                    f"nvrtcCreateProgram({name})")
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            status = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
            buf = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, buf), "log")
            log = buf.value.decode(errors="replace")
            if status != 0:
                raise NvrtcError(f"{name}: {self.lib.nvrtcGetErrorString(status).decode()}\n{log}")
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
            if size.value == 0:
                raise NvrtcError(f"{name}: NVRTC produced no cubin (is the arch a real sm_XX?)")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetCUBIN(prog, cubin), "cubin")
            return cubin.raw, log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_options(arch, include_dirs, verbose=False):
    opts = [f"--gpu-architecture=sm_{arch}", *NVRTC_OPTIONS]
    opts += [f"-I{d}" for d in include_dirs]
    if verbose:
        opts.append("--ptxas-options=-v")  # register and spill counts in the log
    return opts


def build(src_dir=SRC_DIR, out_dir=OUT_DIR, archs=ARCHS, verbose=False, jobs=None):
    """Compiles every .cu of src_dir for every arch into out_dir; returns the written paths.

    Nothing is written unless every compilation succeeds.
    """
    lib, builtins, runtime_include = find_nvrtc()
    nvrtc = Nvrtc(lib, builtins)
    src_dir = Path(src_dir)
    include_dirs = [src_dir] + ([runtime_include] if runtime_include else [])
    sources = sorted(src_dir.glob("*.cu"))
    if not sources:
        raise FileNotFoundError(f"no .cu files under {src_dir}")
    out_dir = Path(out_dir)
    print(f"NVRTC {'.'.join(map(str, nvrtc.version()))}: {len(sources)} sources x "
          f"{len(archs)} archs -> {out_dir}")

    def one(job):
        src, arch = job
        t0 = time.perf_counter()
        cubin, log = nvrtc.compile(src.read_text(), src.name,
                                   compile_options(arch, include_dirs, verbose))
        return out_dir / f"{src.stem}.sm_{arch}.cubin", cubin, log, time.perf_counter() - t0

    jobs_list = [(s, a) for s in sources for a in archs]
    # ctypes releases the GIL around NVRTC calls, and distinct programs compile concurrently.
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        results = list(pool.map(one, jobs_list))
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, cubin, log, secs in results:
        path.write_bytes(cubin)
        print(f"  {path.name}: {len(cubin)} bytes, {secs:.1f} s")
        if verbose and log.strip():
            print("    " + log.strip().replace("\n", "\n    "))
    return [r[0] for r in results]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(SRC_DIR), help="directory of .cu sources")
    ap.add_argument("--out", default=str(OUT_DIR), help="output directory")
    ap.add_argument("--arch", nargs="+", default=list(ARCHS),
                    help="sm_XX numbers (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compilations")
    ap.add_argument("--verbose", action="store_true", help="print ptxas register/spill report")
    ap.add_argument("--print-archs", action="store_true",
                    help="print the default arch list (space-separated) and exit")
    args = ap.parse_args(argv)
    if args.print_archs:
        print(" ".join(ARCHS))
        return 0
    try:
        build(args.src, args.out, args.arch, args.verbose, args.jobs)
    except (NvrtcError, FileNotFoundError, OSError) as e:
        print(f"build_cubins: FAILED\n{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
