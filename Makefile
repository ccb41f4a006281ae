# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Every source under csrc/, at any depth (a per-folder list missed csrc/cpu/engine/).
BUILD_INPUTS := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cc' -o -name '*.h' \
                  -o -name '*.cu' -o -name '*.cuh' \)) \
                CMakeLists.txt setup.py pyproject.toml tools/build_cubins.py \
                fusedres/cuda/build_options.py

.PHONY: setup demo test bench clean

$(VENV)/.installed: $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# As any source install: the build requirements (pyproject.toml) bring MXNet's headers and
	# NVRTC, and the build makes the extension, the MXNet operators and the cubins.
	$(PIP) install -q -e ".[cpu,test,bench,lint]"
	touch $@

setup: $(VENV)/.installed

# Stock timed as its best configuration (as in bench/benchenv.py): every processor, MXNet's
# numpy copies serial (README, "One environment setting"); values already set are kept.
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} \
	MXNET_CPU_PARALLEL_SIZE=$${MXNET_CPU_PARALLEL_SIZE:-2000000000} $(PY) -m fusedres

# Lint first (ruff.toml, .clang-format), then every test: both implementations (the `impl`
# fixture), the CUDA kernels on the emulation in both schedules (the `cuda_target` fixture), the
# configuration matrix.
CXX_SOURCES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cc' 'csrc/*.cu' 'csrc/*.cuh' \
                'tests/cuda_emu/*.h')
.PHONY: lint
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --style=file --dry-run --Werror $(CXX_SOURCES)

test: lint
	$(PY) -m pytest tests

# PyTorch is the optional peer: 2.13.0 is the local CPU build on these machines (elsewhere pick
# a CPU wheel yourself); without it the PyTorch columns stay empty.
bench: setup
	$(PIP) install -q torch==2.13.0 || echo "PyTorch not installed: benchmarking without it"
	$(PY) -m pytest bench/test_cpu.py --benchmark-only -q --benchmark-json=bench/results_cpu.json

# The sweep: fused against stock MXNet and PyTorch over a grid of N, C, L, K, stride, dilation
# and groups; writes bench/results_sweep.{md,json,png} with every shape where fused is slower
# than a peer (bench/sweep.py). The default sample takes about 3 minutes on 2 cores;
# SWEEP_ARGS="--shapes 96 --max-gflop 1" (about 50) or "--full" (hours) for more.
SWEEP_ARGS ?= --shapes 40 --reps 5 --max-gflop 0.5
.PHONY: bench-sweep
bench-sweep: setup
	$(PIP) install -q torch==2.13.0 || echo "PyTorch not installed: sweeping without it"
	$(PY) bench/sweep.py $(SWEEP_ARGS)

clean:
	rm -rf build dist *.egg-info fusedres/_C*.so fusedres/libfusedres_mxop.so fusedres/cubins \
	    fusedres/cuda_src bench/results_cpu.json .benchmarks .pytest_cache $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Release artifacts: dist/fusedres-*.tar.gz and, built from it, a manylinux2014 wheel for each
# CPython of WHEEL_PYTHONS (zig's clang, NVRTC cubins for fusedres/cuda/build_options.py's archs,
# the MXNet operator library and cubins built once for all; see tools/build_wheel.sh), and
# dist/SHA256SUMS. Needs only PyPI and the interpreters (found as tools/wheel_pythons.sh says).
# The list is also what pyproject.toml's requires-python and classifiers and
# fusedres/__main__.py's TESTED_PYTHONS say (tests/test_python_versions.py checks).
WHEEL_PYTHONS ?= 3.8 3.9 3.10 3.11
.PHONY: wheels wheels-check wheel wheel-check source-check
wheels:
	PYTHON=$(PYTHON) WHEEL_PYTHONS="$(WHEEL_PYTHONS)" bash tools/build_wheel.sh

# Each wheel in a fresh venv of its Python, away from the source tree: smoke checks,
# python -m fusedres tiny, the test suite (tools/check_wheel.sh says how much of it where).
wheels-check: wheels
	PYTHON=$(PYTHON) WHEEL_PYTHONS="$(WHEEL_PYTHONS)" bash tools/check_wheel.sh

# The names from before there were several wheels: the same targets.
wheel: wheels
wheel-check: wheels-check

# A source install is the whole package: a clean export of HEAD and the sdist made from it,
# each pip-installed with [cpu] into a fresh venv, must report the same MXNet operators and
# cubins as this checkout's venv (tools/check_source_install.sh).
source-check: setup
	PYTHON=$(PYTHON) bash tools/check_source_install.sh

# On a GPU machine with CuPy (no MXNet, venv or network needed): the CUDA tests on the GPU,
# compute-sanitizer on a small case of every kernel, bench/bench_cuda.py; writes
# bench/results_cuda.md. GPU_PYTHON: the Python that has CuPy. See tools/gpu_check.sh.
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) bash tools/gpu_check.sh
