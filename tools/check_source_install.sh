#!/usr/bin/env bash
# `make source-check`: a source install is the whole package. From a clean export of HEAD
# (git archive: only what is committed) and from the sdist built from that export, each
# `pip install "<it>[cpu]"` into a fresh venv (pip's isolated build, the build requirements of
# pyproject.toml, the system compiler) must give what `make setup` gives: `python -m fusedres
# tiny` reports the MXNet operators registered, the same cubins, and passes its correctness
# check; its component lines must equal those of this checkout's venv.
# Knobs: PYTHON (default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
WORK="$ROOT/build/source-check"
t_start=$SECONDS
step() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - t_start))"; }

# The lines of `python -m fusedres` that say what is installed (paths and timings left out).
components() {
  grep -E '^(MXNet operators|CUDA cubins):|^  (PASS|FAIL)' | sed -E -e 's/ from [^ ]+//' -e 's/^  (PASS|FAIL):.*/  \1/'
}

rm -rf "$WORK"
mkdir -p "$WORK/export"
step "clean export of $(git rev-parse --short HEAD)"
git archive HEAD | tar -x -C "$WORK/export"

step "reference: this checkout's venv"
.venv/bin/python -m fusedres tiny > "$WORK/reference.txt"
components < "$WORK/reference.txt" > "$WORK/reference.components"
cat "$WORK/reference.components"
grep -q "^MXNet operators: .* registered" "$WORK/reference.components" \
  || { echo "check_source_install: the reference venv lacks the MXNet operators" >&2; exit 1; }

step "sdist of the export"
"$PYTHON" -m venv "$WORK/build-venv"
"$WORK/build-venv/bin/python" -m pip install -q --upgrade pip build
"$WORK/build-venv/bin/python" -m build --sdist --outdir "$WORK/dist" "$WORK/export" > /dev/null
SDIST="$(ls "$WORK"/dist/fusedres-*.tar.gz)"

status=0
for target in "$WORK/export" "$SDIST"; do
  name="$(basename "$target")"
  step "fresh venv: pip install $name[cpu]"
  venv="$WORK/venv-$name"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$target[cpu]"
  (cd "$WORK" && "$venv/bin/python" -m fusedres tiny) > "$WORK/$name.txt"
  components < "$WORK/$name.txt" > "$WORK/$name.components"
  if diff -u "$WORK/reference.components" "$WORK/$name.components"; then
    echo "same MXNet operators, cubins and correctness as make setup"
  else
    echo "check_source_install: $name installs a different package (diff above)" >&2
    status=1
  fi
  if grep -q "INCOMPLETE INSTALL" "$WORK/$name.txt"; then
    grep "INCOMPLETE INSTALL" "$WORK/$name.txt" >&2
    status=1
  fi
done
step "done"
exit "$status"
