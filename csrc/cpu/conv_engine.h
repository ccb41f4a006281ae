// The conv1d + batchnorm + relu engine, written once over the vector traits of isa_traits.h and
// compiled once per instruction set (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp). Its parts:
// engine/common.h (helpers, the normalization), engine/conv_tiles.h (the convolution),
// engine/forward.h and engine/backward.h (the passes); this file defines the entry points.
//
// The convolution is a GEMM over (input channel, tap) done without im2col: for stride 1 the
// input of tap k is the input row shifted by k*dilation - pad, so a register tile of
// MR output channels x NR vectors of positions accumulates straight from the input rows
// (masked loads at the zero-padded edges). Stride > 1 first splits each input chunk into its
// `stride` phases, which turns every tap into a shifted view again.
//
// Work is split into units (batch item, chunk of positions, make_chunks); batch statistics are
// kept per unit (shifted sums, merged in unit order with Chan's formula), and the weight
// gradient is accumulated in per-thread double buffers summed in thread order: deterministic
// for a given OMP_NUM_THREADS. The units do not depend on the thread count unless there are
// few of them for the threads (small batches: N * chunks < 8 * threads), where they are cut to
// balance the threads' work; forward results then differ in their last bits between thread
// counts.
#pragma once
#include <omp.h>

#include "conv1d_bn_relu.h"
#include "isa.h"
// The vector traits first: the engine's parts are written over them.
#include "isa_traits.h"

#include "engine/backward.h"
#include "engine/depthwise.h"
#include "engine/forward.h"

namespace fusedres {
namespace FUSEDRES_ISA_NS {

#define FUSEDRES_ISA_DEFINE(T)                                                                     \
  void forward_train(const Conv1dShape& s, const T* x, const T* w, const T* bias, const T* gamma,  \
                     const T* beta, T* rm, T* rv, double eps, double mom, bool ubs, T* z, T* mean, \
                     T* invstd, T* y, bool relu) {                                                 \
    if (depthwise(s))                                                                              \
      dw_forward_train<T>(s, x, w, bias, gamma, beta, rm, rv, eps, mom, ubs, z, mean, invstd, y,   \
                          relu);                                                                   \
    else                                                                                           \
      forward_train_impl<T>(s, x, w, bias, gamma, beta, rm, rv, eps, mom, ubs, z, mean, invstd, y, \
                            relu);                                                                 \
  }                                                                                                \
  void forward_infer(const Conv1dShape& s, const T* x, const T* w, const T* bias, const T* gamma,  \
                     const T* beta, const T* rm, const T* rv, double eps, T* y, bool relu) {       \
    if (depthwise(s))                                                                              \
      dw_forward_infer<T>(s, x, w, bias, gamma, beta, rm, rv, eps, y, relu);                       \
    else                                                                                           \
      forward_infer_impl<T>(s, x, w, bias, gamma, beta, rm, rv, eps, y, relu);                     \
  }                                                                                                \
  void backward(const Conv1dShape& s, bool bs, const T* dy, const T* x, const T* w, const T* z,    \
                const T* gamma, const T* beta, const T* mean, const T* invstd, T* dx, T* dw,       \
                T* dbias, T* dgamma, T* dbeta, bool relu) {                                        \
    if (depthwise(s))                                                                              \
      dw_backward<T>(s, bs, dy, x, w, z, gamma, beta, mean, invstd, dx, dw, dbias, dgamma, dbeta,  \
                     relu);                                                                        \
    else                                                                                           \
      backward_impl<T>(s, bs, dy, x, w, z, gamma, beta, mean, invstd, dx, dw, dbias, dgamma,       \
                       dbeta, relu);                                                               \
  }

FUSEDRES_ISA_DEFINE(float)
FUSEDRES_ISA_DEFINE(double)

// The compute ceiling of this instruction set on one thread: `reps` rounds of independent
// float multiply-adds, more chains than any core's FMA latency x ports needs. Returns the
// floating-point operations done. The chains' results are summed into `sink[2]`, and without
// -ffast-math the compiler can neither drop nor reassociate them.
int64_t fma_loop(int64_t reps, float* sink) {
  using V = VF;
  // Enough independent chains to cover latency x FMA ports, few enough to stay in registers.
#if defined(FUSEDRES_ISA_AVX512)
  constexpr int CHAINS = 16;
#else
  constexpr int CHAINS = 12;
#endif
  typename V::reg acc[CHAINS];
  const typename V::reg a = V::set1(sink[0]), b = V::set1(sink[1]);
  for (int i = 0; i < CHAINS; ++i) acc[i] = V::set1(float(i));
  for (int64_t r = 0; r < reps; ++r) {
#pragma GCC unroll 16
    for (int i = 0; i < CHAINS; ++i) acc[i] = V::fma(acc[i], a, b);
  }
  typename V::reg t = V::zero();
  for (int i = 0; i < CHAINS; ++i) t = V::add(t, acc[i]);
  sink[2] = V::hsum(t);
  return reps * CHAINS * 2 * V::W;
}

}  // namespace FUSEDRES_ISA_NS
}  // namespace fusedres
