// Index helpers, buffers, the thread threshold and one channel's normalization (bn_pre, relu,
// relu_grad, BnChannel) that forward and backward share.
// Part of the conv engine (conv_engine.h): compiled once per instruction set, inside that
// translation unit's namespace, after isa_traits.h; not a header of its own.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/conv1d_bn_relu.h"
#include "cpu/pack_cache.h"

namespace fusedres {
namespace FUSEDRES_ISA_NS {
namespace {

using i64 = int64_t;

#if defined(FUSEDRES_ISA_AVX512)
constexpr i64 kIsaId = 2;
#elif defined(FUSEDRES_ISA_AVX2)
constexpr i64 kIsaId = 1;
#else
constexpr i64 kIsaId = 0;
#endif

// A pack_cache lookup held for the scope (the entry stays valid until then).
struct PackCacheRef {
  PackCacheLookup l;
  PackCacheRef(const Span* in, int n, size_t result_bytes)
      : l(pack_cache_find(in, n, result_bytes)) {}
  ~PackCacheRef() { pack_cache_release(l.entry); }
  PackCacheRef(const PackCacheRef&) = delete;
  PackCacheRef& operator=(const PackCacheRef&) = delete;
};

FR_INLINE i64 imin(i64 a, i64 b) { return a < b ? a : b; }
FR_INLINE i64 imax(i64 a, i64 b) { return a > b ? a : b; }
FR_INLINE i64 iclamp(i64 v, i64 lo, i64 hi) { return v < lo ? lo : (v > hi ? hi : v); }
FR_INLINE i64 cdiv(i64 a, i64 b) { return (a + b - 1) / b; }  // a >= 0, b > 0
FR_INLINE i64 fdiv(i64 a, i64 b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
FR_INLINE i64 fmod_pos(i64 a, i64 b) { return a - fdiv(a, b) * b; }
FR_INLINE i64 rup(i64 a, i64 b) { return cdiv(a, b) * b; }

// Below this much work (multiply-adds, or elements for the elementwise passes) a parallel
// region costs more than it saves: waking the team, and on a small machine its spinning
// threads take the cores MXNet's next operator needs. Tiny tensors run on the calling thread.
FR_INLINE bool worth_threads(i64 work) { return work >= (i64(1) << 16); }

// x86 L1 data caches have 64 sets of 64-byte lines (32 KiB 8-way, 48 KiB 12-way): rows a
// multiple of 4 KiB apart all start in one set, and a tile that reads a line or two of each of
// many such rows misses L1 on every one. Whether more than 4 of the first 64 rows `stride_bytes`
// apart start in one set (AVX2, one thread, the forward of (32, 64, L) -> 64 k3: L = 1024 ran
// at 57% of the FMA peak, L = 1000 at 82%).
inline bool rows_alias(i64 stride_bytes, i64 nrows) {
  int count[64] = {};
  int most = 0;
  for (i64 r = 0; r < imin(nrows, 64); ++r) {
    const int c = ++count[((r * stride_bytes) >> 6) & 63];
    most = c > most ? c : most;
  }
  return most > 4;
}

// The smallest row stride >= n elements that is an odd number of 64-byte lines: consecutive
// rows then start in different L1 sets, 64 rows in all 64.
template <typename T>
FR_INLINE i64 alias_free_ld(i64 n) {
  constexpr i64 E = 64 / i64(sizeof(T));
  const i64 lines = cdiv(imax(n, 1), E);
  return (lines | 1) * E;
}

template <typename T>
T* alloc(i64 n) {
  size_t bytes = size_t(imax(n, 1)) * sizeof(T);
  bytes = (bytes + 63) / 64 * 64;
  return static_cast<T*>(std::aligned_alloc(64, bytes));
}

// RAII buffer without any std template (see isa_traits.h for why).
template <typename T>
struct Buf {
  T* p = nullptr;
  explicit Buf(i64 n) : p(alloc<T>(n)) {}
  Buf() = default;
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

// A grow-only scratch buffer per calling thread, so the large dz buffer of the backward is
// not page-faulted in again on every call.
template <typename T>
T* workspace(i64 n) {
  struct Cache {
    void* p = nullptr;
    i64 bytes = 0;
    ~Cache() { std::free(p); }
  };
  static thread_local Cache c;
  const i64 want = n * i64(sizeof(T));
  if (want > c.bytes) {
    std::free(c.p);
    c.bytes = (want + 63) / 64 * 64;
    c.p = std::aligned_alloc(64, size_t(c.bytes));
  }
  return static_cast<T*>(c.p);
}

// Channel co's saved statistics from its batch mean and biased variance, the running ones
// updated as MXNet does (running = momentum * running + (1 - momentum) * batch) when given.
template <typename T>
FR_INLINE void batch_stats_of(i64 co, double mu, double var, double eps, double momentum, T* mean,
                              T* invstd, T* running_mean, T* running_var) {
  mean[co] = static_cast<T>(mu);
  invstd[co] = static_cast<T>(1.0 / std::sqrt(var + eps));
  if (running_mean && running_var) {
    running_mean[co] = static_cast<T>(momentum * running_mean[co] + (1 - momentum) * mu);
    running_var[co] = static_cast<T>(momentum * running_var[co] + (1 - momentum) * var);
  }
}

// Channel co's saved statistics from the running ones (use_global_stats, inference).
template <typename T>
FR_INLINE void running_stats_of(i64 co, double eps, const T* running_mean, const T* running_var,
                                T* mean, T* invstd) {
  mean[co] = running_mean[co];
  invstd[co] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(running_var[co]) + eps));
}

// The normalization of one channel: pre = (z - mean) * a + beta with a = gamma * invstd, in
// the order MXNet's BatchNorm computes it, so infinities and NaN come out as in the stock
// blocks (a folded z * a + (beta - mean * a) turns an infinite a into inf - inf = NaN).
// Forward and backward both derive the relu mask from bn_pre, so they agree bit for bit.
template <class V>
FR_INLINE typename V::reg bn_pre(typename V::reg z, typename V::reg mean, typename V::reg a,
                                 typename V::reg beta) {
  return V::fma(V::sub(z, mean), a, beta);
}

// relu(v) that keeps NaN (max returns its second operand when either is NaN), as MXNet's relu.
template <class V>
FR_INLINE typename V::reg relu(typename V::reg v) {
  return V::max(V::zero(), v);
}

// dy * relu'(pre) with relu' = 1 (pre > 0), 0 (pre <= 0), NaN (pre NaN): MXNet's
// dy * relu_grad(pre), so a NaN anywhere reaches the gradient.
template <class V>
FR_INLINE typename V::reg relu_grad(typename V::reg dy, typename V::reg pre) {
  const typename V::reg d = V::maskz(V::gt0(pre), V::set1(typename V::T(1)));
  return V::mul(dy, V::select(V::nan(pre), pre, d));
}

// One channel's normalization, broadcast to registers.
template <class V>
struct BnChannel {
  using T = typename V::T;
  using reg = typename V::reg;
  reg mean, a, beta;
  bool with_relu;
  BnChannel(T gamma_, T beta_, T mean_, T invstd_, bool with_relu_)
      : mean(V::set1(mean_)),
        a(V::set1(gamma_ * invstd_)),
        beta(V::set1(beta_)),
        with_relu(with_relu_) {}
  FR_INLINE reg pre(reg z) const { return bn_pre<V>(z, mean, a, beta); }
  FR_INLINE reg out(reg z) const { return with_relu ? relu<V>(pre(z)) : pre(z); }
  // The gradient reaching pre: dy * relu'(pre), or dy without relu.
  FR_INLINE reg grad(reg z, reg dy) const { return with_relu ? relu_grad<V>(dy, pre(z)) : dy; }
};

}  // namespace
}  // namespace FUSEDRES_ISA_NS
}  // namespace fusedres
