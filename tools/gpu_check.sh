#!/usr/bin/env bash
# `make gpu-check`: the CUDA code on a real GPU, in under 8 minutes on one H200.
#   1. tests/test_cuda_kernels.py and tests/test_cuda_emulator.py on CuPy: with the shipped
#      cubin for the device when fusedres/cubins has one (tools/build_cubins.py; a gitignored
#      build product, bring it along), and compiled from csrc/cuda by CuPy's NVRTC;
#   2. compute-sanitizer memcheck, racecheck, initcheck and synccheck on
#      tools/gpu_check_cases.py (a small case of each of the 37 kernels), where the tool exists;
#   3. bench/bench_cuda.py;
# and writes bench/results_cuda.md: device, driver, date, the benchmark table, each check's
# outcome. Needs a GPU, CuPy, numpy and pytest in GPU_PYTHON (default python3); PyTorch is the
# benchmark's optional baseline. No MXNet, no venv, no network. Without pytest there, bring its
# wheels: `bash tools/gpu_check.sh --fetch-wheels` on a machine with PyPI fills
# build/gpu-wheels (pure-Python wheels), which this script then unpacks onto PYTHONPATH.
# Every step has a time limit (together 455 s); a failed or timed-out step is reported and fails
# the run at the end, after the others have run.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${GPU_PYTHON:-python3}"
WHEELS="$ROOT/build/gpu-wheels"
WORK="$ROOT/build/gpu-check"
RESULTS="$ROOT/bench/results_cuda.md"

if [ "${1:-}" = "--fetch-wheels" ]; then
  # pytest and its dependencies as pure-Python wheels for Python >= 3.9, with the backports
  # that Pythons before 3.11 need.
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  exec "$PY" -m pip download -q --only-binary=:all: --python-version 3.9 -d "$WHEELS" \
    "pytest>=7" exceptiongroup tomli
fi

t0=$SECONDS
mkdir -p "$WORK"
SUMMARY="$WORK/summary.md"
: > "$SUMMARY"
status=0
note() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }
# step NAME SECONDS CMD...: runs CMD with a time limit, logs to build/gpu-check/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  printf '\n== %s (limit %ss; %ss so far)\n' "$name" "$limit" "$((SECONDS - t0))"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  if [ "$rc" -eq 0 ]; then
    note "- $name: passed ($took s)"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    note "- $name: **timed out** after $limit s"
    status=1
  else
    note "- $name: **failed** (exit $rc, $took s; last line: $(tail -n 1 "$WORK/$name.log"))"
    status=1
  fi
}

if ! "$PY" -c 'import cupy, sys; sys.exit(cupy.cuda.runtime.getDeviceCount() < 1)' 2>/dev/null; then
  echo "gpu-check: $PY has no CuPy with a usable GPU (set GPU_PYTHON)" >&2
  exit 1
fi
PYLIB=""
if ! "$PY" -c 'import pytest' 2>/dev/null; then
  if ! ls "$WHEELS"/pytest-*.whl >/dev/null 2>&1; then
    echo "gpu-check: $PY has no pytest; run 'bash tools/gpu_check.sh --fetch-wheels' where" \
         "PyPI is reachable and bring build/gpu-wheels along" >&2
    exit 1
  fi
  PYLIB="$WORK/pylib"  # pure-Python wheels unpacked are importable as they are
  rm -rf "$PYLIB" && mkdir -p "$PYLIB"
  for whl in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$whl" "$PYLIB" || exit 1; done
fi

DEVICE="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null |
  head -n 1 | sed 's/, / (driver /; s/$/)/')"
[ -n "$DEVICE" ] || DEVICE="$("$PY" -c 'import cupy; r = cupy.cuda.runtime; v = r.driverGetVersion()
print(r.getDeviceProperties(0)["name"].decode(), f"(driver for CUDA {v // 1000}.{v % 1000 // 10})")')"
note "- device: $DEVICE"
note "- software: $("$PY" -c 'import cupy, numpy, sys; print("python", sys.version.split()[0],
  "cupy", cupy.__version__, "numpy", numpy.__version__)')"
CUBIN="$("$PY" tools/gpu_check_cases.py --which-cubin)"

# FUSEDRES_CUDA_EMULATOR=0: the tests fail rather than fall back to the CPU emulation.
PYTEST=(env FUSEDRES_CUDA_EMULATOR=0 PYTHONPATH="$PYLIB${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m
        pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_emulator.py)
if [ -n "$CUBIN" ]; then
  step tests-cubin 75 env -u FUSEDRES_CUDA_FROM_SOURCE "${PYTEST[@]}"
else
  note "- tests-cubin: not run (fusedres/cubins has no cubin for this device)"
fi
step tests-nvrtc 100 env FUSEDRES_CUDA_FROM_SOURCE=1 "${PYTEST[@]}"

SANITIZER="$(command -v compute-sanitizer || true)"
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [ -z "$SANITIZER" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ]; then
    SANITIZER="$d/bin/compute-sanitizer"
  fi
done
if [ -n "$SANITIZER" ]; then
  "$SANITIZER" --version | tail -n 1
  for tool in memcheck racecheck initcheck synccheck; do
    step "sanitizer-$tool" 45 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      --print-limit 20 "$PY" tools/gpu_check_cases.py
  done
else
  note "- compute-sanitizer: not run (not found on PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda)"
fi

step bench 100 "$PY" bench/bench_cuda.py --reps 30 --out "$WORK/bench.md"

{
  if [ -s "$WORK/bench.md" ]; then cat "$WORK/bench.md"; else echo "# fusedres CUDA kernels"; fi
  echo
  echo "## make gpu-check ($(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - t0)) s)"
  echo
  cat "$SUMMARY"
} > "$RESULTS"
printf '\nwrote %s (%ss)\n' "$RESULTS" "$((SECONDS - t0))"
exit "$status"
