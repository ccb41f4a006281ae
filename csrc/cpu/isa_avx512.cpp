// The conv engine compiled for AVX-512 (F, BW, DQ, VL) + FMA (flags set on this file in
// CMakeLists.txt). Without those flags it compiles the portable code, which dispatch never picks.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__FMA__)
#define FUSEDRES_ISA_AVX512 1
#endif
#define FUSEDRES_ISA_NS isa_avx512
#include "conv_engine.h"
