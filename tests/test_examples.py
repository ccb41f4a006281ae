"""Every example in examples/ runs and does what it says."""
import os
import runpy
import sys

import pytest

# Every test here runs on both implementations (conftest.py: impl_env).
pytestmark = pytest.mark.usefixtures("impl_env")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        return runpy.run_path(os.path.join(ROOT, "examples", name))
    finally:
        sys.path.pop(0)


def test_res_cnn1d_trains():
    assert _load("res_cnn1d.py")["main"](steps=5) < 0.7


def test_fuse_resnet1d():
    report = _load("fuse_resnet1d.py")["main"]()
    # The stem and both convs of each block (the second as ConvBN1D, before the join).
    assert len(report.fused) == 5 and not report.left


def test_symbol_api():
    score = dict(_load("symbol_api.py")["main"]())
    assert score["accuracy"] > 0.5


def test_flux_skip():
    ident, cat = _load("flux_skip.py")["main"]()
    assert ident.min().asscalar() >= 0
    assert cat.shape == (2, 12, 30)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "examples"))
                                        if n.endswith(".py")))
def test_every_example_is_tested(name):
    tested = {"res_cnn1d.py", "fuse_resnet1d.py", "symbol_api.py", "flux_skip.py"}
    assert name in tested, f"examples/{name} has no test in tests/test_examples.py"
