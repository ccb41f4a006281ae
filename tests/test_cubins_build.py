"""tools/build_cubins.py: every csrc/cuda/*.cu compiles with NVRTC 11.8 for every shipped arch,
offline (no GPU, no nvcc), and each cubin holds the entry points fusedres.cuda launches."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from fusedres import cuda

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "build_cubins.py"
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _load_tool():
    spec = importlib.util.spec_from_file_location("build_cubins", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build_cubins = _load_tool()
try:
    build_cubins.find_nvrtc()
except FileNotFoundError as e:
    # The `test` extra installs NVRTC (and every build uses it): missing is a broken install.
    pytest.fail(f"NVRTC wheel: {e} (pip install '.[test]')", pytrace=False)


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def cubin_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cubins")
    proc = _run("--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_every_source_has_a_kernel_list():
    assert {p.stem for p in SOURCES} == set(cuda.KERNELS)


@pytest.mark.parametrize("arch", build_cubins.ARCHS)
@pytest.mark.parametrize("source", [p.stem for p in SOURCES])
def test_cubin_per_arch_has_the_kernels(cubin_dir, source, arch):
    path = cubin_dir / f"{source}.sm_{arch}.cubin"
    assert path.is_file(), f"{path.name} was not produced"
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", f"{path.name} is not an ELF cubin"
    missing = [k for k in cuda.KERNELS[source] if b"\0" + k.encode() + b"\0" not in data]
    assert not missing, f"{path.name} lacks entry points {missing}"


def test_compile_error_fails_loudly(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cu").write_text('extern "C" __global__ void broken(float* p) { p[0] = q; }\n')
    proc = _run("--src", src, "--out", tmp_path / "out", "--arch", "80")
    assert proc.returncode != 0
    assert "broken.cu" in proc.stderr and "identifier \"q\" is undefined" in proc.stderr
    assert not list((tmp_path / "out").glob("*.cubin"))
