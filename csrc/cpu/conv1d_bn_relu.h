// Fused conv1d + batchnorm + relu on the CPU: raw pointers and sizes, NCW contiguous layout.
// Knows nothing of MXNet or Python; the caller validates shapes (see csrc/bindings.cpp).
#pragma once
#include <cstdint>

namespace fusedres {

struct Conv1dShape {
  int64_t N, Cin, L;  // data (N, Cin, L)
  int64_t Cout, K;    // weight (Cout, Cin / groups, K)
  int64_t stride, pad, dilation, groups;
  int64_t Lout() const { return (L + 2 * pad - dilation * (K - 1) - 1) / stride + 1; }
};

// relu = false everywhere below gives conv + batchnorm alone (no relu, no mask).

// Training forward (or any forward that keeps what backward needs).
// z:      conv output before normalization, (N, Cout, Lout), saved for backward.
// mean, invstd: per-channel statistics used to normalize, saved for backward.
// batch_stats: normalize with the batch's statistics (biased variance) and, when
//   running_mean/running_var are non-null, update them as MXNet does:
//   running = momentum * running + (1 - momentum) * batch.
//   Otherwise normalize with running_mean/running_var (use_global_stats) and leave them alone.
template <typename T>
void conv1d_bn_relu_forward_train(const Conv1dShape& s, const T* x, const T* w, const T* bias,
                                  const T* gamma, const T* beta, T* running_mean, T* running_var,
                                  double eps, double momentum, bool batch_stats, T* z, T* mean,
                                  T* invstd, T* y, bool relu = true);

// Inference forward: batchnorm folded into the conv weights, relu in the epilogue, one pass.
template <typename T>
void conv1d_bn_relu_forward_infer(const Conv1dShape& s, const T* x, const T* w, const T* bias,
                                  const T* gamma, const T* beta, const T* running_mean,
                                  const T* running_var, double eps, T* y, bool relu = true);

// Backward from what forward_train saved. Any gradient pointer may be null (not wanted).
// batch_stats must match the forward: with batch statistics the gradient flows through
// mean and variance too.
template <typename T>
void conv1d_bn_relu_backward(const Conv1dShape& s, bool batch_stats, const T* dy, const T* x,
                             const T* w, const T* z, const T* gamma, const T* beta, const T* mean,
                             const T* invstd, T* dx, T* dw, T* dbias, T* dgamma, T* dbeta,
                             bool relu = true);

}  // namespace fusedres
