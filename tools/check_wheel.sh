#!/usr/bin/env bash
# `make wheels-check`: each wheel of `make wheels` (dist/fusedres-*-cp3XX-*.whl, one per Python of
# WHEEL_PYTHONS) is installed into a fresh venv of its own Python (with its `cpu` and `test`
# extras, from PyPI) and checked there, away from the source tree:
#   1. tools/wheel_smoke.py: imports resolve to site-packages, cubins and CUDA sources are
#      shipped, OpenMP coexists with MXNet's, a fork after fused ops neither hangs nor breaks
#      them, the MXNet operators load and train;
#   2. `python -m fusedres tiny`: the environment report (no "untested Python" warning),
#      correctness, one timing row;
#   3. the test suite, against the installed wheel: the checkout minus fusedres/ is copied into a
#      scratch root whose fusedres/ holds only symlinks into the installed package (no
#      __init__.py, so `import fusedres` still resolves to site-packages; tests that load files
#      by path get the installed ones); a pytest plugin fails the run unless fusedres is the
#      installed one.
# First dist/SHA256SUMS is checked (sha256sum -c), and that there is a wheel for every Python.
#
# How much of the suite where: every Python runs the WHOLE suite. Measured from a fresh clone on
# the 2 shared cores here: the suite 215-225 s per Python, the venv, smoke checks and
# `python -m fusedres tiny` about 35 s more, so about 4.3 minutes a Python and 17 for the four
# (plus about 5-8 for `make wheels`), which CI's 90 allow; nothing is skipped for any Python.
# WHEEL_CHECK_SUBSET_PYTHONS lists entries of WHEEL_PYTHONS that run only SUBSET instead
# (default none; about 2.5 minutes less a Python), for a quicker pass.
#
# Knobs: WHEEL_PYTHONS (default: PYTHON's version; the Makefile passes its list),
# WHEEL_CHECK_SUBSET_PYTHONS (see above), FUSEDRES_CUDA_ARCHS (the archs the wheels were built
# with; default: the wheel's own fusedres/cuda/build_options.py list, which wheel_smoke.py reads).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
# shellcheck source=tools/wheel_pythons.sh
. tools/wheel_pythons.sh
PYTHON="${PYTHON:-python3}"
WHEEL_PYTHONS="${WHEEL_PYTHONS:-$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
SUBSET_PYTHONS=" ${WHEEL_CHECK_SUBSET_PYTHONS:-} "
# The representative subset: the op-level suites on both implementations, the MXNet operator
# library's load and ABI checks, the blocks end to end (every implementation and device, the GPU
# path emulated), Module/Symbol, the examples, and the CPU kernels against the reference.
SUBSET=(tests/test_python_versions.py tests/test_native_ops.py tests/test_ops.py
        tests/test_blocks.py tests/test_module_api.py tests/test_examples.py
        tests/test_kernels_cpu.py)
ARCHS="${FUSEDRES_CUDA_ARCHS:-}"
WORK="$ROOT/build/wheel-check"
t_start=$SECONDS
step() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - t_start))"; }

step "dist/SHA256SUMS"
(cd dist && sha256sum -c SHA256SUMS)
WANTS=() INTERPS=() TAGS=() WHEELS=()
shopt -s nullglob
for want in $WHEEL_PYTHONS; do
  interp="$(wheel_python "$want")"
  tag="$(wheel_tag "$interp")"
  wheels=(dist/fusedres-*-"$tag"-"$tag"-*manylinux*.whl)
  [ "${#wheels[@]}" -eq 1 ] || { echo "check_wheel: want exactly one $tag wheel in dist/, found ${#wheels[@]} (make wheels)" >&2; exit 1; }
  grep -q " ${wheels[0]#dist/}\$" dist/SHA256SUMS \
    || { echo "check_wheel: ${wheels[0]} is not in dist/SHA256SUMS" >&2; exit 1; }
  WANTS+=("$want") INTERPS+=("$interp") TAGS+=("$tag") WHEELS+=("$ROOT/${wheels[0]}")
done
rm -rf "$WORK"

# One Python's checks; run in a subshell with errexit, so that the first failure ends them and
# the next Python is still checked.
check_one() {
  local i="$1"
  local interp="${INTERPS[$i]}" tag="${TAGS[$i]}" WHEEL="${WHEELS[$i]}"
  VENV="$WORK/$tag/venv"
  step "$tag: fresh venv of $interp: pip install $(basename "$WHEEL")[cpu,test]"
  mkdir -p "$WORK/$tag"
  "$interp" -m venv "$VENV"
  PY="$VENV/bin/python"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "$WHEEL[cpu,test]"
  "$PY" -c 'import sys; print("Python", sys.version.split()[0], "at", sys.executable)'

  # Everything below runs from a scratch directory, never from the checkout.
  RUN="$WORK/$tag/run"
  mkdir -p "$RUN"
  cp tools/wheel_smoke.py "$RUN/"

  step "$tag: wheel_smoke.py"
  # shellcheck disable=SC2086
  (cd "$RUN" && FUSEDRES_FOREIGN_IOMP5="$ROOT/build/wheel/tools-venv/lib/libiomp5.so" "$PY" wheel_smoke.py $ARCHS)

  step "$tag: python -m fusedres tiny"
  (cd "$RUN" && "$PY" -m fusedres tiny) | tee "$RUN/tiny.txt"
  if grep -q "untested" "$RUN/tiny.txt"; then
    echo "check_wheel: python -m fusedres calls $tag untested, but it is in WHEEL_PYTHONS" >&2
    exit 1
  fi

  # From the scratch directory: `python -c` puts the working directory first on sys.path, and
  # from the checkout that is the source tree's fusedres (with its editable build's _C).
  PKG="$(cd "$RUN" && "$PY" -c 'import fusedres, os; print(os.path.dirname(os.path.realpath(fusedres.__file__)))')"
  case "$PKG" in
    "$(cd "$RUN" && "$PY" -c 'import os, sysconfig; print(os.path.realpath(sysconfig.get_paths()["platlib"]))')"/*) ;;
    *) echo "check_wheel: fusedres imports from $PKG, not from the venv's site-packages" >&2; exit 1 ;;
  esac
  FAKE="$RUN/root"
  mkdir -p "$FAKE/fusedres" "$FAKE/plugins"
  # The checkout's files outside the package (tests/, examples/, tools/, csrc/, pyproject.toml for
  # the pytest settings, ...), which tests read by path; the package itself only as symlinks.
  git ls-files -z --cached --others --exclude-standard | "$PY" -c '
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
for f in sys.stdin.buffer.read().decode().split("\0"):
    if f and not f.startswith(("fusedres/", ".ci/")) and os.path.isfile(os.path.join(src, f)):
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
' "$ROOT" "$FAKE"
  for entry in "$PKG"/*; do
    case "$(basename "$entry")" in __init__.py|__pycache__) ;; *) ln -s "$entry" "$FAKE/fusedres/" ;; esac
  done
  cat > "$FAKE/plugins/fusedres_wheel_check.py" <<'EOF'
import os
import sys
import sysconfig

import pytest

SITE = os.path.realpath(sysconfig.get_paths()["platlib"])


def _where():
    import fusedres
    from fusedres import _C
    return fusedres.__file__, _C.__file__


def pytest_report_header(config):
    pkg, ext = _where()
    return [f"fusedres under test: {pkg}", f"fusedres._C under test: {ext}",
            f"Python under test: {sys.version.split()[0]} ({sys.executable})"]


def pytest_sessionstart(session):
    for path in _where():
        if not os.path.realpath(path).startswith(SITE + os.sep):
            pytest.exit(f"{path} is not the installed wheel's (site-packages: {SITE})", 3)
EOF
  find "$FAKE" -name __pycache__ -prune -exec rm -rf {} +
  if [[ "$SUBSET_PYTHONS" == *" ${WANTS[$i]} "* ]]; then
    what="the subset: ${SUBSET[*]}"
    targets=("${SUBSET[@]}")
  else
    what="the whole suite"
    targets=(tests)
  fi
  step "$tag: pytest against the installed wheel, $what"
  # The pytest script (not `python -m pytest`) keeps the scratch root off sys.path.
  echo "$what" > "$WORK/$tag/what.txt"
  (cd "$FAKE" && PYTHONPATH="$FAKE/plugins" "$VENV/bin/pytest" -p fusedres_wheel_check \
     -p no:cacheprovider "${targets[@]}") | tee "$RUN/pytest.txt"
}

summary=() failed=()
for i in "${!TAGS[@]}"; do
  tag="${TAGS[$i]}"
  t_py=$SECONDS
  set +e
  (set -e; check_one "$i")
  status=$?
  set -e
  what="$(cat "$WORK/$tag/what.txt" 2>/dev/null || echo "no tests")"
  result="$(tail -1 "$WORK/$tag/run/pytest.txt" 2>/dev/null | sed -E 's/^=+ //; s/ =+$//')"
  if [ "$status" -ne 0 ]; then
    failed+=("$tag")
    result="FAILED (exit $status)${result:+: $result}"
  fi
  summary+=("$tag ($("${INTERPS[$i]}" -c 'import platform; print(platform.python_version())')): $what: $result [$((SECONDS - t_py)) s]")
done

step "done"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "check_wheel: the checks failed for ${failed[*]} (see above)" >&2
  exit 1
fi
# Last, so that a pytest summary line closes the output.
tail -1 "$WORK/${TAGS[-1]}/run/pytest.txt"
