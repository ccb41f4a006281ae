# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BUILD_INPUTS := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/mxop/*.cc csrc/cuda/*.cu \
                  csrc/cuda/*.cuh) \
                CMakeLists.txt setup.py pyproject.toml requirements-cuda-build.txt

.PHONY: setup demo test bench clean

$(VENV)/.installed: $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# MXNet first: the build compiles the native op library against the lib_api.h it ships.
	$(PIP) install -q "mxnet==1.9.1" "numpy>=1.22,<1.24"
	$(PIP) install -q -e ".[cpu,test,bench]" -r requirements-cuda-build.txt
	# CUDA kernels to cubins for sm_70..sm_90 with NVRTC 11.8 from PyPI: no GPU or nvcc needed.
	$(PY) tools/build_cubins.py
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m fusedres

# The block-level suites once more with the native ops off, so the CustomOp path the blocks
# fall back to (grad_req='add', static_alloc, GPU) is tested end to end as well.
test: setup
	$(PY) -m pytest tests
	FUSEDRES_NATIVE=0 $(PY) -m pytest -q tests/test_blocks.py tests/test_residual.py \
	    tests/test_fuse.py tests/test_examples.py

# PyTorch is the optional peer: 2.13.0 is the local CPU build on these machines (elsewhere pick
# a CPU wheel yourself); without it the PyTorch columns stay empty.
bench: setup
	$(PIP) install -q torch==2.13.0 || echo "PyTorch not installed: benchmarking without it"
	$(PY) -m pytest bench/test_cpu.py --benchmark-only -q --benchmark-json=bench/results_cpu.json

clean:
	rm -rf build dist *.egg-info fusedres/_C*.so $(VENV)

# Release artifacts: dist/fusedres-*.tar.gz and a manylinux2014 wheel built from it (zig's clang,
# NVRTC cubins for sm_70..sm_90; see tools/build_wheel.sh). Needs only PyPI.
.PHONY: wheel wheel-check
wheel:
	PYTHON=$(PYTHON) bash tools/build_wheel.sh

# The wheel in a fresh venv, away from the source tree: smoke checks, python -m fusedres, tests.
wheel-check: wheel
	PYTHON=$(PYTHON) bash tools/check_wheel.sh

# On a GPU machine with CuPy (no MXNet, venv or network needed): the CUDA tests on the GPU,
# compute-sanitizer on a small case of every kernel, bench/bench_cuda.py; writes
# bench/results_cuda.md. GPU_PYTHON: the Python that has CuPy. See tools/gpu_check.sh.
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) bash tools/gpu_check.sh
