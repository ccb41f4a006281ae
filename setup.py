"""Thin shim: builds the CMake project into fusedres/_C; all build logic is in CMakeLists.txt."""
import os
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        # The package's other built files (the MXNet operator library, cubins, CUDA sources):
        # an editable install imports them from the source tree, where setuptools copies only
        # the extension itself.
        data_dir = ROOT / "fusedres" if (self.inplace or self.editable_mode) else out_dir
        subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(build_dir),
             f"-DPython_EXECUTABLE={sys.executable}",
             f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
             f"-DFUSEDRES_PACKAGE_DATA_DIR={data_dir}"],
            check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel",
                        str(os.cpu_count() or 1)], check=True)


# The license is here, not in pyproject.toml: setuptools >= 77 writes it as a PEP 639
# License-Expression, which Python 3.8's last setuptools (75.3) cannot; that one gets the older
# License field.
LICENSE = "Apache-2.0"
license_kw = ({"license_expression": LICENSE} if int(setuptools.__version__.split(".")[0]) >= 77
              else {"license": LICENSE})

setup(ext_modules=[CMakeExtension("fusedres._C")], cmdclass={"build_ext": CMakeBuild},
      **license_kw)
