#!/usr/bin/env bash
# `make wheel-check`: installs dist/fusedres-*.whl into a fresh venv (with its `cpu` and `test`
# extras, from PyPI) and checks it there, away from the source tree:
#   1. tools/wheel_smoke.py: imports resolve to site-packages, cubins and CUDA sources are
#      shipped, OpenMP coexists with MXNet's, the MXNet operators load and train;
#   2. `python -m fusedres tiny`: the environment report, correctness, one timing row;
#   3. the test suite, against the installed wheel: the checkout minus fusedres/ is copied into a
#      scratch root whose fusedres/ holds only symlinks into the installed package (no
#      __init__.py, so `import fusedres` still resolves to site-packages; tests that load files
#      by path get the installed ones); a pytest plugin fails the run unless fusedres is the
#      installed one.
# Knobs: PYTHON (default python3), FUSEDRES_CUDA_ARCHS (the archs the wheel was built with;
# default: the wheel's own fusedres/cuda/build_options.py list, which wheel_smoke.py reads).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
ARCHS="${FUSEDRES_CUDA_ARCHS:-}"
WORK="$ROOT/build/wheel-check"
VENV="$WORK/venv"
t_start=$SECONDS
step() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - t_start))"; }

shopt -s nullglob
wheels=(dist/fusedres-*.whl)
[ "${#wheels[@]}" -eq 1 ] || { echo "check_wheel: want exactly one dist/fusedres-*.whl, found ${#wheels[@]} (make wheel)" >&2; exit 1; }
WHEEL="$ROOT/${wheels[0]}"

step "fresh venv $VENV: pip install $(basename "$WHEEL")[cpu,test]"
rm -rf "$WORK"
mkdir -p "$WORK"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$WHEEL[cpu,test]"
PY="$VENV/bin/python"

# Everything below runs from a scratch directory, never from the checkout.
RUN="$WORK/run"
mkdir -p "$RUN"
cp tools/wheel_smoke.py "$RUN/"
cd "$RUN"

step "wheel_smoke.py"
# shellcheck disable=SC2086
FUSEDRES_FOREIGN_IOMP5="$ROOT/build/wheel/tools-venv/lib/libiomp5.so" "$PY" wheel_smoke.py $ARCHS

step "python -m fusedres tiny"
"$PY" -m fusedres tiny

step "pytest against the installed wheel (check so far: $((SECONDS - t_start)) s)"
PKG="$("$PY" -c 'import fusedres, os; print(os.path.dirname(os.path.realpath(fusedres.__file__)))')"
FAKE="$RUN/root"
mkdir -p "$FAKE/fusedres" "$FAKE/plugins"
# The checkout's files outside the package (tests/, examples/, tools/, csrc/, pyproject.toml for
# the pytest settings, ...), which tests read by path; the package itself only as symlinks.
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) | "$PY" -c '
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
import sysconfig

import pytest

SITE = os.path.realpath(sysconfig.get_paths()["platlib"])


def _where():
    import fusedres
    from fusedres import _C
    return fusedres.__file__, _C.__file__


def pytest_report_header(config):
    pkg, ext = _where()
    return [f"fusedres under test: {pkg}", f"fusedres._C under test: {ext}"]


def pytest_sessionstart(session):
    for path in _where():
        if not os.path.realpath(path).startswith(SITE + os.sep):
            pytest.exit(f"{path} is not the installed wheel's (site-packages: {SITE})", 3)
EOF
cd "$FAKE"
find . -name __pycache__ -prune -exec rm -rf {} +
# The pytest script (not `python -m pytest`) keeps the scratch root off sys.path.
# Last, so that pytest's summary closes the output.
PYTHONPATH="$FAKE/plugins" "$VENV/bin/pytest" -p fusedres_wheel_check -p no:cacheprovider tests
