"""How csrc/cuda/*.cu is compiled, defined once: the NVRTC options and the cubin arch list.

Read by fusedres.cuda.loader (NVRTC at run time, when no shipped cubin fits) and by
tools/build_cubins.py (the shipped cubins, for CMake and tools/build_wheel.sh), which loads this
file by path: it runs in build environments without MXNet, so this file imports nothing. Shell
scripts ask ``python tools/build_cubins.py --print-archs``; tools/wheel_smoke.py reads the
installed wheel's copy.
"""

# Every compilation of the kernels: the cubins (tools/build_cubins.py adds the target arch and
# the include directories) and the run-time fallback through CuPy (which adds the include
# directories).
NVRTC_OPTIONS = ("-std=c++17", "-DNDEBUG")

# sm_XX of the shipped cubins. A device loads the one of its major version with the highest
# minor version not above its own (loader.cubin_for): 86 also serves sm_89, say. Which GPUs
# that covers: the README's "Installing on a GPU cluster".
ARCHS = ("70", "75", "80", "86", "90")
