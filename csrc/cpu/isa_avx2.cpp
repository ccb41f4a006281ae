// The conv engine compiled for AVX2 + FMA (flags set on this file in CMakeLists.txt). Without
// those flags (a non-x86 build) it compiles the portable code, which dispatch never picks.
#if defined(__AVX2__) && defined(__FMA__)
#define FUSEDRES_ISA_AVX2 1
#endif
#define FUSEDRES_ISA_NS isa_avx2
#include "conv_engine.h"
