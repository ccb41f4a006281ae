# Sourced by tools/build_wheel.sh and tools/check_wheel.sh: the interpreters of WHEEL_PYTHONS.
#
# WHEEL_PYTHONS (the Makefile's variable, "3.8 3.9 3.10 3.11" there) lists the CPython versions to
# build and check wheels for. Each entry is a version X.Y, found as the first of
#   1. pythonX.Y on PATH, if it runs (a pyenv shim for a version pyenv does not enable fails);
#   2. $PYENV_ROOT/versions/X.Y.*/bin/pythonX.Y (PYENV_ROOT defaults to ~/.pyenv; newest patch);
# or a path to an interpreter (any entry with a '/').

# wheel_python ENTRY: prints the interpreter for ENTRY, or fails saying what is missing.
wheel_python() {
  local want="$1" cand
  if [[ "$want" == */* ]]; then
    "$want" -c 'import sys' 2>/dev/null || { echo "wheel_pythons: $want does not run" >&2; return 1; }
    echo "$want"
    return 0
  fi
  [[ "$want" =~ ^3\.[0-9]+$ ]] || { echo "wheel_pythons: '$want' is not X.Y nor a path" >&2; return 1; }
  cand="$(command -v "python$want" 2>/dev/null || true)"
  if [ -n "$cand" ] && [ "$("$cand" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; then
    echo "$cand"
    return 0
  fi
  cand="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want".*/bin/"python$want" 2>/dev/null | sort -V | tail -1)"
  if [ -n "$cand" ] && "$cand" -c 'import sys' 2>/dev/null; then
    echo "$cand"
    return 0
  fi
  echo "wheel_pythons: no Python $want (neither python$want on PATH nor" \
       "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want.*): install it (pyenv install $want)," \
       "or name its interpreter in WHEEL_PYTHONS" >&2
  return 1
}

# wheel_tag INTERPRETER: its wheel tag, e.g. cp38.
wheel_tag() {
  "$1" -c 'import sys; print("cp%d%d" % sys.version_info[:2]); assert sys.implementation.name == "cpython", "CPython only"'
}
