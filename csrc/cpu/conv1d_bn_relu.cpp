// Public entry points of the CPU conv1d + batchnorm + relu kernels: pick the instruction-set
// variant of the engine (conv_engine.h, compiled in isa_*.cpp) at run time.
#include "conv1d_bn_relu.h"

#include <cstdlib>
#include <cstring>

#include "isa.h"

namespace fusedres {

CpuIsa cpu_isa() {
  static const CpuIsa best = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return CpuIsa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::avx2;
#endif
    return CpuIsa::generic;
  }();
  const char* want = std::getenv("FUSEDRES_CPU_ISA");
  if (!want || !*want) return best;
  CpuIsa w = best;
  if (!std::strcmp(want, "generic")) w = CpuIsa::generic;
  else if (!std::strcmp(want, "avx2")) w = CpuIsa::avx2;
  else if (!std::strcmp(want, "avx512")) w = CpuIsa::avx512;
  return static_cast<int>(w) < static_cast<int>(best) ? w : best;
}

#define FUSEDRES_DISPATCH(call)                   \
  switch (cpu_isa()) {                            \
    case CpuIsa::avx512: isa_avx512::call; break; \
    case CpuIsa::avx2: isa_avx2::call; break;     \
    default: isa_generic::call; break;            \
  }

template <typename T>
void conv1d_bn_relu_forward_train(const Conv1dShape& s, const T* x, const T* w, const T* bias,
                                  const T* gamma, const T* beta, T* running_mean,
                                  T* running_var, double eps, double momentum,
                                  bool use_batch_stats, T* z, T* mean, T* invstd, T* y,
                                  bool relu) {
  FUSEDRES_DISPATCH(forward_train(s, x, w, bias, gamma, beta, running_mean, running_var, eps,
                                  momentum, use_batch_stats, z, mean, invstd, y, relu))
}

template <typename T>
void conv1d_bn_relu_forward_infer(const Conv1dShape& s, const T* x, const T* w, const T* bias,
                                  const T* gamma, const T* beta, const T* running_mean,
                                  const T* running_var, double eps, T* y, bool relu) {
  FUSEDRES_DISPATCH(
      forward_infer(s, x, w, bias, gamma, beta, running_mean, running_var, eps, y, relu))
}

template <typename T>
void conv1d_bn_relu_backward(const Conv1dShape& s, bool batch_stats, const T* dy, const T* x,
                             const T* w, const T* z, const T* gamma, const T* beta,
                             const T* mean, const T* invstd, T* dx, T* dw, T* dbias,
                             T* dgamma, T* dbeta, bool relu) {
  FUSEDRES_DISPATCH(backward(s, batch_stats, dy, x, w, z, gamma, beta, mean, invstd, dx, dw,
                             dbias, dgamma, dbeta, relu))
}

#define FUSEDRES_INSTANTIATE(T)                                                              \
  template void conv1d_bn_relu_forward_train<T>(const Conv1dShape&, const T*, const T*,      \
                                                const T*, const T*, const T*, T*, T*, double, \
                                                double, bool, T*, T*, T*, T*, bool);         \
  template void conv1d_bn_relu_forward_infer<T>(const Conv1dShape&, const T*, const T*,      \
                                                const T*, const T*, const T*, const T*,      \
                                                const T*, double, T*, bool);                 \
  template void conv1d_bn_relu_backward<T>(const Conv1dShape&, bool, const T*, const T*,     \
                                           const T*, const T*, const T*, const T*, const T*, \
                                           const T*, T*, T*, T*, T*, T*, bool);
FUSEDRES_INSTANTIATE(float)
FUSEDRES_INSTANTIATE(double)

}  // namespace fusedres
