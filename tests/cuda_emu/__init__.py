"""CPU emulation of CUDA for the tests: cuda_emu.h (the execution model, for compiling
csrc/cuda/*.cu unmodified as C++), build.py (compiling and caching), fake_cupy.py (the CuPy
pieces fusedres.cuda uses). See the README's GPU section."""
