// The conv engine compiled for the avx2 instruction set (flags in CMakeLists.txt).
#define FUSEDRES_ISA_AVX2 1
#define FUSEDRES_ISA_NS isa_avx2
#include "conv_engine.h"
