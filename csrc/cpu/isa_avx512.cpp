// The conv engine compiled for the avx512 instruction set (flags in CMakeLists.txt).
#define FUSEDRES_ISA_AVX512 1
#define FUSEDRES_ISA_NS isa_avx512
#include "conv_engine.h"
