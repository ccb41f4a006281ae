// Correct-first CPU kernels for conv1d + batchnorm + relu. Parallel with OpenMP over
// independent output rows; every reduction has a single owner, so results are deterministic.
#include "conv1d_bn_relu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fusedres {
namespace {

// Range [lo, hi) of output positions l whose input tap l*stride + off lies inside [0, L).
inline void valid_range(int64_t off, int64_t stride, int64_t L, int64_t Lout, int64_t* lo,
                        int64_t* hi) {
  // l*stride + off >= 0  <=>  l >= ceil(-off / stride)
  int64_t a = off >= 0 ? 0 : (-off + stride - 1) / stride;
  // l*stride + off <= L - 1  <=>  l <= floor((L - 1 - off) / stride)
  int64_t b = (L - 1 - off) < 0 ? -1 : (L - 1 - off) / stride;
  *lo = std::min(a, Lout);
  *hi = std::max(*lo, std::min(b + 1, Lout));
}

// Plain grouped, strided, dilated conv: out = conv(x, w) + bias (bias may be null).
template <typename T>
void conv_forward(const Conv1dShape& s, const T* x, const T* w, const T* bias, T* out) {
  const int64_t Lout = s.Lout(), cin_g = s.Cin / s.groups, cout_g = s.Cout / s.groups;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t co = 0; co < s.Cout; ++co) {
      T* o = out + (n * s.Cout + co) * Lout;
      const T b0 = bias ? bias[co] : T(0);
      for (int64_t l = 0; l < Lout; ++l) o[l] = b0;
      const int64_t g = co / cout_g;
      for (int64_t c = 0; c < cin_g; ++c) {
        const T* xr = x + (n * s.Cin + g * cin_g + c) * s.L;
        const T* wr = w + (co * cin_g + c) * s.K;
        for (int64_t k = 0; k < s.K; ++k) {
          const int64_t off = k * s.dilation - s.pad;
          int64_t lo, hi;
          valid_range(off, s.stride, s.L, Lout, &lo, &hi);
          const T wv = wr[k];
          for (int64_t l = lo; l < hi; ++l) o[l] += wv * xr[l * s.stride + off];
        }
      }
    }
  }
}

// dx = conv_transpose(dz, w).
template <typename T>
void conv_backward_data(const Conv1dShape& s, const T* dz, const T* w, T* dx) {
  const int64_t Lout = s.Lout(), cin_g = s.Cin / s.groups, cout_g = s.Cout / s.groups;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t ci = 0; ci < s.Cin; ++ci) {
      T* d = dx + (n * s.Cin + ci) * s.L;
      std::fill(d, d + s.L, T(0));
      const int64_t g = ci / cin_g, c = ci % cin_g;
      for (int64_t co = g * cout_g; co < (g + 1) * cout_g; ++co) {
        const T* gr = dz + (n * s.Cout + co) * Lout;
        const T* wr = w + (co * cin_g + c) * s.K;
        for (int64_t k = 0; k < s.K; ++k) {
          const int64_t off = k * s.dilation - s.pad;
          int64_t lo, hi;
          valid_range(off, s.stride, s.L, Lout, &lo, &hi);
          const T wv = wr[k];
          for (int64_t l = lo; l < hi; ++l) d[l * s.stride + off] += wv * gr[l];
        }
      }
    }
  }
}

// dw = correlate(x, dz), summed over the batch.
template <typename T>
void conv_backward_weight(const Conv1dShape& s, const T* x, const T* dz, T* dw) {
  const int64_t Lout = s.Lout(), cin_g = s.Cin / s.groups, cout_g = s.Cout / s.groups;
#pragma omp parallel for schedule(static)
  for (int64_t co = 0; co < s.Cout; ++co) {
    const int64_t g = co / cout_g;
    for (int64_t c = 0; c < cin_g; ++c) {
      for (int64_t k = 0; k < s.K; ++k) {
        const int64_t off = k * s.dilation - s.pad;
        int64_t lo, hi;
        valid_range(off, s.stride, s.L, Lout, &lo, &hi);
        double acc = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const T* gr = dz + (n * s.Cout + co) * Lout;
          const T* xr = x + (n * s.Cin + g * cin_g + c) * s.L;
          T part = 0;
          for (int64_t l = lo; l < hi; ++l) part += gr[l] * xr[l * s.stride + off];
          acc += part;
        }
        dw[(co * cin_g + c) * s.K + k] = static_cast<T>(acc);
      }
    }
  }
}

// Per-channel affine of the normalization: y = relu(z * a + b). Forward and backward both
// derive the relu mask from this one function, so they agree bit for bit.
template <typename T>
inline void bn_affine(T gamma, T beta, T mean, T invstd, T* a, T* b) {
  *a = gamma * invstd;
  *b = beta - mean * *a;
}

}  // namespace

template <typename T>
void conv1d_bn_relu_forward_train(const Conv1dShape& s, const T* x, const T* w, const T* bias,
                                  const T* gamma, const T* beta, T* running_mean,
                                  T* running_var, double eps, double momentum,
                                  bool use_batch_stats, T* z, T* mean, T* invstd, T* y) {
  const int64_t Lout = s.Lout(), M = s.N * Lout;
  conv_forward(s, x, w, bias, z);
#pragma omp parallel for schedule(static)
  for (int64_t co = 0; co < s.Cout; ++co) {
    if (use_batch_stats) {
      double sum = 0, sq = 0;
      for (int64_t n = 0; n < s.N; ++n) {
        const T* r = z + (n * s.Cout + co) * Lout;
        for (int64_t l = 0; l < Lout; ++l) sum += r[l];
      }
      const double mu = sum / M;
      for (int64_t n = 0; n < s.N; ++n) {
        const T* r = z + (n * s.Cout + co) * Lout;
        for (int64_t l = 0; l < Lout; ++l) sq += (r[l] - mu) * (r[l] - mu);
      }
      const double var = sq / M;
      mean[co] = static_cast<T>(mu);
      invstd[co] = static_cast<T>(1.0 / std::sqrt(var + eps));
      if (running_mean && running_var) {
        running_mean[co] = static_cast<T>(momentum * running_mean[co] + (1 - momentum) * mu);
        running_var[co] = static_cast<T>(momentum * running_var[co] + (1 - momentum) * var);
      }
    } else {
      mean[co] = running_mean[co];
      invstd[co] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(running_var[co]) + eps));
    }
    T a, b;
    bn_affine(gamma[co], beta[co], mean[co], invstd[co], &a, &b);
    for (int64_t n = 0; n < s.N; ++n) {
      const T* r = z + (n * s.Cout + co) * Lout;
      T* o = y + (n * s.Cout + co) * Lout;
      for (int64_t l = 0; l < Lout; ++l) o[l] = std::max(r[l] * a + b, T(0));
    }
  }
}

template <typename T>
void conv1d_bn_relu_forward_infer(const Conv1dShape& s, const T* x, const T* w, const T* bias,
                                  const T* gamma, const T* beta, const T* running_mean,
                                  const T* running_var, double eps, T* y) {
  const int64_t Lout = s.Lout(), wsize = s.K * (s.Cin / s.groups);
  std::vector<T> wf(s.Cout * wsize), bf(s.Cout);
  for (int64_t co = 0; co < s.Cout; ++co) {
    const double scale = gamma[co] / std::sqrt(static_cast<double>(running_var[co]) + eps);
    for (int64_t i = 0; i < wsize; ++i) wf[co * wsize + i] = static_cast<T>(w[co * wsize + i] * scale);
    const double b0 = bias ? bias[co] : 0.0;
    bf[co] = static_cast<T>((b0 - running_mean[co]) * scale + beta[co]);
  }
  conv_forward(s, x, wf.data(), bf.data(), y);
  const int64_t total = s.N * s.Cout * Lout;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < total; ++i) y[i] = std::max(y[i], T(0));
}

template <typename T>
void conv1d_bn_relu_backward(const Conv1dShape& s, bool batch_stats, const T* dy, const T* x,
                             const T* w, const T* z, const T* gamma, const T* beta,
                             const T* mean, const T* invstd, T* dx, T* dw, T* dbias,
                             T* dgamma, T* dbeta) {
  const int64_t Lout = s.Lout(), M = s.N * Lout;
  const bool need_dz = dx || dw || dbias;
  std::vector<T> dz(need_dz ? s.N * s.Cout * Lout : 0);
#pragma omp parallel for schedule(static)
  for (int64_t co = 0; co < s.Cout; ++co) {
    T a, b;
    bn_affine(gamma[co], beta[co], mean[co], invstd[co], &a, &b);
    const T mu = mean[co], is = invstd[co];
    // dReLU and the two dBN reductions: sum(g) and sum(g * xhat).
    double sg = 0, sgx = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      const int64_t row = (n * s.Cout + co) * Lout;
      for (int64_t l = 0; l < Lout; ++l) {
        const T zv = z[row + l];
        if (zv * a + b > T(0)) {
          sg += dy[row + l];
          sgx += dy[row + l] * ((zv - mu) * is);
        }
      }
    }
    if (dgamma) dgamma[co] = static_cast<T>(sgx);
    if (dbeta) dbeta[co] = static_cast<T>(sg);
    if (!need_dz) continue;
    const double mg = batch_stats ? sg / M : 0.0, mgx = batch_stats ? sgx / M : 0.0;
    const T scale = gamma[co] * is;
    double sdz = 0;
    for (int64_t n = 0; n < s.N; ++n) {
      const int64_t row = (n * s.Cout + co) * Lout;
      for (int64_t l = 0; l < Lout; ++l) {
        const T zv = z[row + l];
        const T g = zv * a + b > T(0) ? dy[row + l] : T(0);
        const T xhat = (zv - mu) * is;
        const T d = scale * static_cast<T>(g - mg - xhat * mgx);
        dz[row + l] = d;
        sdz += d;
      }
    }
    if (dbias) dbias[co] = static_cast<T>(sdz);
  }
  if (dx) conv_backward_data(s, dz.data(), w, dx);
  if (dw) conv_backward_weight(s, x, dz.data(), dw);
}

#define FUSEDRES_INSTANTIATE(T)                                                              \
  template void conv1d_bn_relu_forward_train<T>(const Conv1dShape&, const T*, const T*,      \
                                                const T*, const T*, const T*, T*, T*, double, \
                                                double, bool, T*, T*, T*, T*);               \
  template void conv1d_bn_relu_forward_infer<T>(const Conv1dShape&, const T*, const T*,      \
                                                const T*, const T*, const T*, const T*,      \
                                                const T*, double, T*);                       \
  template void conv1d_bn_relu_backward<T>(const Conv1dShape&, bool, const T*, const T*,     \
                                           const T*, const T*, const T*, const T*, const T*, \
                                           const T*, T*, T*, T*, T*, T*);
FUSEDRES_INSTANTIATE(float)
FUSEDRES_INSTANTIATE(double)

}  // namespace fusedres
