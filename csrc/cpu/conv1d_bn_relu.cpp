// Public entry points of the CPU conv1d + batchnorm + relu kernels: pick the instruction-set
// variant of the engine (conv_engine.h, compiled in isa_*.cpp) at run time.
#include "conv1d_bn_relu.h"

#include <cstdlib>
#include <cstring>
#include <new>

#include "isa.h"
#include "threads.h"

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
  if (!std::strcmp(want, "generic"))
    w = CpuIsa::generic;
  else if (!std::strcmp(want, "avx2"))
    w = CpuIsa::avx2;
  else if (!std::strcmp(want, "avx512"))
    w = CpuIsa::avx512;
  return static_cast<int>(w) < static_cast<int>(best) ? w : best;
}

#define FUSEDRES_DISPATCH(call) \
  switch (cpu_isa()) {          \
    case CpuIsa::avx512:        \
      isa_avx512::call;         \
      break;                    \
    case CpuIsa::avx2:          \
      isa_avx2::call;           \
      break;                    \
    default:                    \
      isa_generic::call;        \
      break;                    \
  }

namespace {

// A conv whose stride exceeds its kernel size runs as a stride-K conv over the gathered
// windows xg[n][c][j*K + k] = x[n][c][j*stride - pad + k*dilation] (zero outside the input):
// the engine's phase buffers grow with the stride, the gathered input only with the output.
bool gathers(const Conv1dShape& s) { return s.stride > s.K; }

Conv1dShape gathered(const Conv1dShape& s) {
  Conv1dShape g = s;
  g.L = s.Lout() * s.K;
  g.stride = s.K;
  g.pad = 0;
  g.dilation = 1;
  return g;
}

// The gathered windows live in grow-only buffers of the calling thread (two: the backward
// needs the input's and its gradient's): a fresh allocation of this size is an mmap whose
// pages fault in on every call (measured: a visible share of a strided 1x1 layer's call).
template <typename T>
struct Scratch {
  T* p;
  Scratch(int64_t n, int slot) {
    struct Cache {
      void* p = nullptr;
      size_t bytes = 0;
      ~Cache() { std::free(p); }
    };
    static thread_local Cache cache[2];
    const size_t want = size_t(n > 0 ? n : 1) * sizeof(T);
    Cache& c = cache[slot];
    if (want > c.bytes) {
      std::free(c.p);
      c.p = std::malloc(want);
      c.bytes = c.p ? want : 0;
      if (!c.p) throw std::bad_alloc();
    }
    p = static_cast<T*>(c.p);
  }
};

// Outputs j in [*ja, *jb) read inside the row for tap offset off (p = j * stride + off).
inline void inside(int64_t off, int64_t stride, int64_t L, int64_t Lo, int64_t* ja, int64_t* jb) {
  const int64_t a = off >= 0 ? 0 : (-off + stride - 1) / stride;        // p >= 0
  const int64_t b = L - 1 - off >= 0 ? (L - 1 - off) / stride + 1 : 0;  // p < L
  *ja = a < Lo ? a : Lo;
  *jb = b < Lo ? (b > *ja ? b : *ja) : Lo;
}

// dst[j] = src[j * S] for j in [0, n): a loop of constant stride for the common strides, which
// the compiler vectorizes (shuffles of whole vectors; a runtime stride stays a scalar loop).
template <typename T>
inline void strided_copy(const T* src, int64_t S, T* dst, int64_t n) {
  switch (S) {
    case 2:
      for (int64_t j = 0; j < n; ++j) dst[j] = src[2 * j];
      break;
    case 3:
      for (int64_t j = 0; j < n; ++j) dst[j] = src[3 * j];
      break;
    case 4:
      for (int64_t j = 0; j < n; ++j) dst[j] = src[4 * j];
      break;
    default:
      for (int64_t j = 0; j < n; ++j) dst[j] = src[j * S];
  }
}

// dst[j * S] += src[j * K] for j in [0, n), constant strides as strided_copy.
template <typename T>
inline void strided_add(const T* src, int64_t K, int64_t S, T* dst, int64_t n) {
  if (K == 1 && S == 2)
    for (int64_t j = 0; j < n; ++j) dst[2 * j] += src[j];
  else if (K == 1)
    for (int64_t j = 0; j < n; ++j) dst[j * S] += src[j];
  else
    for (int64_t j = 0; j < n; ++j) dst[j * S] += src[j * K];
}

template <typename T>
void gather_windows(const Conv1dShape& s, const T* x, T* xg) {
  const int64_t Lo = s.Lout(), rows = s.N * s.Cin, K = s.K, S = s.stride;
#pragma omp parallel for schedule(static) if (rows * Lo * s.K > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * s.L;
    T* gr = xg + r * Lo * K;
    for (int64_t k = 0; k < K; ++k) {
      // tap k of window j reads p = j * stride - pad + k * dilation: zero outside the row,
      // a branch-free strided copy inside it (a 1x1 strided projection: one such loop)
      const int64_t off = k * s.dilation - s.pad;
      int64_t ja, jb;
      inside(off, S, s.L, Lo, &ja, &jb);
      for (int64_t j = 0; j < ja; ++j) gr[j * K + k] = T(0);
      const T* src = xr + (ja * S + off);  // p of window ja (inside the row when ja < jb)
      if (K == 1) {
        strided_copy(src, S, gr + ja, jb - ja);
      } else {
        for (int64_t j = ja; j < jb; ++j) gr[j * K + k] = src[(j - ja) * S];
      }
      for (int64_t j = jb; j < Lo; ++j) gr[j * K + k] = T(0);
    }
  }
}

// dx[p] = sum of dxg over the window elements that read p (windows overlap when the dilated
// kernel is wider than the stride).
template <typename T>
void scatter_windows(const Conv1dShape& s, const T* dxg, T* dx) {
  const int64_t Lo = s.Lout(), rows = s.N * s.Cin, K = s.K, S = s.stride;
#pragma omp parallel for schedule(static) if (rows * Lo * s.K > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    T* dr = dx + r * s.L;
    const T* gr = dxg + r * Lo * s.K;
    std::memset(dr, 0, size_t(s.L) * sizeof(T));
    for (int64_t k = 0; k < K; ++k) {  // tap by tap, as gather_windows reads them
      const int64_t off = k * s.dilation - s.pad;
      int64_t ja, jb;
      inside(off, S, s.L, Lo, &ja, &jb);
      T* dst = dr + (ja * S + off);
      strided_add(gr + ja * K + k, K, S, dst, jb - ja);
    }
  }
}

}  // namespace

template <typename T>
void conv1d_bn_relu_forward_train(const Conv1dShape& s, const T* x, const T* w, const T* bias,
                                  const T* gamma, const T* beta, T* running_mean, T* running_var,
                                  double eps, double momentum, bool batch_stats, T* z, T* mean,
                                  T* invstd, T* y, bool relu) {
  const ThreadScope threads;
  if (gathers(s)) {
    const Conv1dShape g = gathered(s);
    Scratch<T> xg(g.N * g.Cin * g.L, 0);
    gather_windows(s, x, xg.p);
    return conv1d_bn_relu_forward_train(g, xg.p, w, bias, gamma, beta, running_mean, running_var,
                                        eps, momentum, batch_stats, z, mean, invstd, y, relu);
  }
  FUSEDRES_DISPATCH(forward_train(s, x, w, bias, gamma, beta, running_mean, running_var, eps,
                                  momentum, batch_stats, z, mean, invstd, y, relu))
}

template <typename T>
void conv1d_bn_relu_forward_infer(const Conv1dShape& s, const T* x, const T* w, const T* bias,
                                  const T* gamma, const T* beta, const T* running_mean,
                                  const T* running_var, double eps, T* y, bool relu) {
  const ThreadScope threads;
  if (gathers(s)) {
    const Conv1dShape g = gathered(s);
    Scratch<T> xg(g.N * g.Cin * g.L, 0);
    gather_windows(s, x, xg.p);
    return conv1d_bn_relu_forward_infer(g, xg.p, w, bias, gamma, beta, running_mean, running_var,
                                        eps, y, relu);
  }
  FUSEDRES_DISPATCH(
      forward_infer(s, x, w, bias, gamma, beta, running_mean, running_var, eps, y, relu))
}

template <typename T>
void conv1d_bn_relu_backward(const Conv1dShape& s, bool batch_stats, const T* dy, const T* x,
                             const T* w, const T* z, const T* gamma, const T* beta, const T* mean,
                             const T* invstd, T* dx, T* dw, T* dbias, T* dgamma, T* dbeta,
                             bool relu) {
  const ThreadScope threads;
  if (gathers(s)) {
    const Conv1dShape g = gathered(s);
    Scratch<T> xg(g.N * g.Cin * g.L, 0), dxg(dx ? g.N * g.Cin * g.L : 0, 1);
    gather_windows(s, x, xg.p);
    conv1d_bn_relu_backward(g, batch_stats, dy, xg.p, w, z, gamma, beta, mean, invstd,
                            dx ? dxg.p : nullptr, dw, dbias, dgamma, dbeta, relu);
    if (dx) scatter_windows(s, dxg.p, dx);
    return;
  }
  FUSEDRES_DISPATCH(backward(s, batch_stats, dy, x, w, z, gamma, beta, mean, invstd, dx, dw, dbias,
                             dgamma, dbeta, relu))
}

#define FUSEDRES_INSTANTIATE(T)                                                                    \
  template void conv1d_bn_relu_forward_train<T>(const Conv1dShape&, const T*, const T*, const T*,  \
                                                const T*, const T*, T*, T*, double, double, bool,  \
                                                T*, T*, T*, T*, bool);                             \
  template void conv1d_bn_relu_forward_infer<T>(const Conv1dShape&, const T*, const T*, const T*,  \
                                                const T*, const T*, const T*, const T*, double,    \
                                                T*, bool);                                         \
  template void conv1d_bn_relu_backward<T>(const Conv1dShape&, bool, const T*, const T*, const T*, \
                                           const T*, const T*, const T*, const T*, const T*, T*,   \
                                           T*, T*, T*, T*, bool);
FUSEDRES_INSTANTIATE(float)
FUSEDRES_INSTANTIATE(double)

}  // namespace fusedres
