"""Fixtures and hooks: the implementations (impl, impl_env) and the CUDA targets (cuda_target).
What tests share besides fixtures is in helpers.py."""
import sys
import types
from pathlib import Path

import pytest

try:
    import mxnet  # noqa: F401
except ImportError:
    # The CUDA kernel tests also run on GPU machines without MXNet: make the MXNet-free
    # submodules (fusedres.reference, fusedres.cuda) importable without fusedres/__init__.py,
    # which insists on MXNet.
    _pkg = types.ModuleType("fusedres")
    _pkg.__path__ = [str(Path(__file__).resolve().parent.parent / "fusedres")]
    sys.modules["fusedres"] = _pkg

from helpers import cuda_targets  # noqa: E402

if sys.version_info < (3, 10) and "mxnet" in sys.modules:
    import subprocess
    import threading
    import time

    _popen_init = subprocess.Popen.__init__

    def _popen_init_after_customops(self, *args, **kwargs):
        """Python 3.8 and 3.9 start subprocesses with fork(), which runs MXNet's fork handler. It
        joins MXNet's CustomOp threads, and one that has just finished an op frees the op's
        state (a Python callback) under the lock the handler takes, waiting for the GIL that the
        forking thread holds: a deadlock in MXNet (Python >= 3.10 spawns with vfork, which runs
        no fork handlers). So queued work finishes, and those threads get the GIL, first (from
        the main thread: MXNet's threads must not wait for themselves; tests/cuda_emu/build.py,
        which runs there, spawns without fork)."""
        if threading.current_thread() is threading.main_thread():
            mxnet.nd.waitall()
            time.sleep(0.02)
        _popen_init(self, *args, **kwargs)

    subprocess.Popen.__init__ = _popen_init_after_customops


def pytest_generate_tests(metafunc):
    if "cuda_target" in metafunc.fixturenames:  # decided only where CUDA tests are collected
        metafunc.parametrize("cuda_target", cuda_targets(), indirect=True, scope="module")


@pytest.fixture(scope="module")
def cuda_target(request):
    """(name, cupy module) for each CUDA target: ("gpu", cupy) or ("emu-<schedule>", stand-in).

    The emulation's stand-in is `import cupy` for fusedres.cuda only while the module's tests
    run, with fusedres.cuda.loader's per-device caches emptied, so that nothing leaks to other
    tests.
    """
    if request.param == "gpu":
        import cupy
        yield request.param, cupy
        return
    from cuda_emu import fake_cupy

    from fusedres.cuda import loader
    with fake_cupy.installed(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(fake_cupy.config, "schedule", request.param[len("emu-"):])
        mp.setattr(loader, "_modules", {})
        mp.setattr(loader, "_sm_counts", {})
        yield request.param, fake_cupy


# The two implementations of every op, as the `use_native` argument of the functional forms
# and blocks selects them: the MXNet operators (the CPU path) and the CustomOps (the GPU and
# portable path, here on the CPU). Tests that take `impl` run once for each.
IMPLS = {"native": True, "custom": False}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    return IMPLS[request.param]


# Where a block-level test runs: the CPU with each implementation, and the GPU through the
# CustomOps (the only GPU implementation): the GPU backend on the CUDA emulation, with the
# tests' CPU NDArrays standing in for GPU ones (tests/cuda_emu/mxnet_gpu.py).
TARGETS = ("native", "custom", "gpu")


@pytest.fixture(params=TARGETS)
def impl_env(request, monkeypatch):
    """The whole test on one target, chosen for every block it builds through FUSEDRES_NATIVE
    (for modules of block-level tests: `pytestmark = usefixtures("impl_env")`). Returns the
    target's name."""
    if request.param != "native":
        monkeypatch.setenv("FUSEDRES_NATIVE", "0")
    if request.param != "gpu":
        yield request.param
        return
    from cuda_emu.mxnet_gpu import cpu_as_gpu
    with cpu_as_gpu():
        yield request.param
