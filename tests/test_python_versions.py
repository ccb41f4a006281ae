"""The Pythons fusedres says it supports: one list (fusedres.__main__.TESTED_PYTHONS) that the
package metadata, the Makefile's WHEEL_PYTHONS and `python -m fusedres` agree with."""
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

import fusedres.__main__ as main

ROOT = Path(__file__).resolve().parents[1]
TESTED = ((3, 8), (3, 9), (3, 10), (3, 11))


@pytest.mark.parametrize("version_info", [(3, 8, 18, "final", 0), (3, 9, 0), (3, 10, 13),
                                          (3, 11, 7, "candidate", 1)])
def test_no_warning_on_a_tested_python(version_info):
    assert main.untested_python_warning(version_info) is None


@pytest.mark.parametrize("version_info", [(3, 7, 16), (3, 12, 1), (3, 13, 0), (4, 0, 0), (2, 7)])
def test_warning_on_an_untested_python(version_info):
    line = main.untested_python_warning(version_info)
    assert line == (f"WARNING: Python {version_info[0]}.{version_info[1]} is untested: "
                    f"fusedres {main.__version__} is built and tested for CPython "
                    "3.8, 3.9, 3.10, 3.11 only")


def test_python_m_fusedres_prints_the_warning(monkeypatch, capsys):
    main.environment()
    assert "untested" not in capsys.readouterr().out   # the suite runs on tested Pythons only
    monkeypatch.setattr(main, "TESTED_PYTHONS", ((2, 7),))
    main.environment()
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("WARNING: Python 3.") and "CPython 2.7 only" in lines[1]


def test_the_list_is_the_tested_one():
    assert main.TESTED_PYTHONS == TESTED


def test_package_metadata_names_the_tested_pythons():
    """requires-python and the classifiers of the installed package (the wheel's, under
    `make wheels-check`)."""
    meta = metadata.metadata("fusedres")
    spec = SpecifierSet(meta["Requires-Python"])
    allowed = tuple((3, minor) for minor in range(30) if f"3.{minor}" in spec)
    assert allowed == TESTED, meta["Requires-Python"]
    versions = sorted(tuple(int(v) for v in c.rsplit(" ", 1)[1].split("."))
                      for c in meta.get_all("Classifier")
                      if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert tuple(versions) == TESTED


def test_makefile_builds_wheels_for_the_tested_pythons():
    makefile = (ROOT / "Makefile").read_text()
    (line,) = re.findall(r"^WHEEL_PYTHONS \?= (.*)$", makefile, re.M)
    assert tuple(tuple(int(v) for v in e.split(".")) for e in line.split()) == TESTED
