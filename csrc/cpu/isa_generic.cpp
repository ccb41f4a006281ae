// The conv engine compiled for the generic instruction set (flags in CMakeLists.txt).
#define FUSEDRES_ISA_NS isa_generic
#include "conv_engine.h"
