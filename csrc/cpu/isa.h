// Per-instruction-set entry points of the conv engine (conv_engine.h). Each namespace is
// compiled in its own translation unit with its own flags; conv1d_bn_relu.cpp picks one at
// run time (cpu_isa()).
#pragma once
#include "conv1d_bn_relu.h"

namespace fusedres {

enum class CpuIsa { generic = 0, avx2 = 1, avx512 = 2 };

// Best instruction set this CPU supports, lowered by the environment variable
// FUSEDRES_CPU_ISA=generic|avx2|avx512 (read on every call; for tests and comparisons).
CpuIsa cpu_isa();

#define FUSEDRES_ISA_DECLARE_T(T)                                                                  \
  void forward_train(const Conv1dShape& s, const T* x, const T* w, const T* bias, const T* gamma,  \
                     const T* beta, T* rm, T* rv, double eps, double mom, bool ubs, T* z, T* mean, \
                     T* invstd, T* y, bool relu);                                                  \
  void forward_infer(const Conv1dShape& s, const T* x, const T* w, const T* bias, const T* gamma,  \
                     const T* beta, const T* rm, const T* rv, double eps, T* y, bool relu);        \
  void backward(const Conv1dShape& s, bool bs, const T* dy, const T* x, const T* w, const T* z,    \
                const T* gamma, const T* beta, const T* mean, const T* invstd, T* dx, T* dw,       \
                T* dbias, T* dgamma, T* dbeta, bool relu);
#define FUSEDRES_ISA_DECLARE(NS)               \
  namespace NS {                               \
  FUSEDRES_ISA_DECLARE_T(float)                \
  FUSEDRES_ISA_DECLARE_T(double)               \
  int64_t fma_loop(int64_t reps, float* sink); \
  }

FUSEDRES_ISA_DECLARE(isa_generic)
FUSEDRES_ISA_DECLARE(isa_avx2)
FUSEDRES_ISA_DECLARE(isa_avx512)

const char* isa_name(CpuIsa isa);

// The float32 multiply-add peak of `isa` (at most cpu_isa()) on kernel_threads() threads,
// measured for about `seconds`: the compute ceiling the benchmarks report against.
double fma_peak_gflops(CpuIsa isa, double seconds);

}  // namespace fusedres
