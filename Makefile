# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BUILD_INPUTS := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h) CMakeLists.txt setup.py \
                pyproject.toml

.PHONY: setup demo test bench clean

$(VENV)/.installed: $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[cpu,test,bench]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m fusedres

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf build dist *.egg-info fusedres/_C*.so $(VENV)
