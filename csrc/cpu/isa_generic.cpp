// The conv engine in portable C++ (the library's baseline flags): the fallback for CPUs
// without AVX2.
#define FUSEDRES_ISA_NS isa_generic
#include "conv_engine.h"
