// The conv1d + batchnorm + relu engine, written once over the vector traits of isa_traits.h and
// compiled once per instruction set (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp).
//
// The convolution is a GEMM over (input channel, tap) done without im2col: for stride 1 the
// input of tap k is the input row shifted by k*dilation - pad, so a register tile of
// MR output channels x NR vectors of positions accumulates straight from the input rows
// (masked loads at the zero-padded edges). Stride > 1 first splits each input chunk into its
// `stride` phases, which turns every tap into a shifted view again.
//
// Work is split into units (batch item, chunk of positions) chosen independently of the number
// of threads; batch statistics are kept per unit (shifted sums, merged in unit order with
// Chan's formula) so forward results do not depend on the thread count. The weight gradient
// is accumulated in per-thread double buffers summed in thread order: deterministic for a given
// OMP_NUM_THREADS.
#pragma once
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "conv1d_bn_relu.h"
#include "isa.h"
#include "isa_traits.h"

namespace fusedres {
namespace FUSEDRES_ISA_NS {
namespace {

using i64 = int64_t;

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
      : mean(V::set1(mean_)), a(V::set1(gamma_ * invstd_)), beta(V::set1(beta_)),
        with_relu(with_relu_) {}
  FR_INLINE reg pre(reg z) const { return bn_pre<V>(z, mean, a, beta); }
  FR_INLINE reg out(reg z) const { return with_relu ? relu<V>(pre(z)) : pre(z); }
  // The gradient reaching pre: dy * relu'(pre), or dy without relu.
  FR_INLINE reg grad(reg z, reg dy) const { return with_relu ? relu_grad<V>(dy, pre(z)) : dy; }
};

// Input of one tap: element (ci, j) is base[ci * cs + j + off], valid (else zero) when
// 0 <= j + off < len.
template <typename T>
struct Tap {
  const T* base;
  i64 off, len;
};

enum Epi { E_STORE = 0, E_STATS = 1, E_RELU = 2 };

// Accumulates acc[r][v] += sum_{t, ci} wblk[t][ci][r] * tap_t(ci, j + v*W + lane).
template <class V, int MR, int NR, bool MASKED>
FR_INLINE void conv_mk(const Tap<typename V::T>* taps, int ntaps, i64 nci, i64 cs,
                       const typename V::T* wblk, i64 j, typename V::reg (&acc)[MR][NR]) {
  using T = typename V::T;
  using reg = typename V::reg;
  constexpr int W = V::W;
  for (int t = 0; t < ntaps; ++t) {
    const T* p = taps[t].base + j + taps[t].off;
    const T* w = wblk + i64(t) * nci * MR;
    if (MASKED) {
      typename V::mask m[NR];
#pragma GCC unroll 8
      for (int v = 0; v < NR; ++v) {
        const i64 st = j + taps[t].off + i64(v) * W;
        m[v] = V::range(int(iclamp(-st, 0, W)), int(iclamp(taps[t].len - st, 0, W)));
      }
      for (i64 ci = 0; ci < nci; ++ci) {
        reg xv[NR];
#pragma GCC unroll 8
        for (int v = 0; v < NR; ++v) xv[v] = V::loadm(p + v * W, m[v]);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const reg wv = V::set1(w[r]);
#pragma GCC unroll 8
          for (int v = 0; v < NR; ++v) acc[r][v] = V::fma(wv, xv[v], acc[r][v]);
        }
        p += cs;
        w += MR;
      }
    } else {
      for (i64 ci = 0; ci < nci; ++ci) {
        reg xv[NR];
#pragma GCC unroll 8
        for (int v = 0; v < NR; ++v) xv[v] = V::load(p + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const reg wv = V::set1(w[r]);
#pragma GCC unroll 8
          for (int v = 0; v < NR; ++v) acc[r][v] = V::fma(wv, xv[v], acc[r][v]);
        }
        p += cs;
        w += MR;
      }
    }
  }
}

// One (batch item, group, chunk [ja, jb) of output positions) of a conv, all output-channel
// blocks. wp: packed weights [cb][tap][ci][MR] (zero rows past `rows`). out: row r of the
// output at out + r * ostride, indexed by absolute position j. stats (E_STATS): per row
// {shift, sum(z - shift), sum((z - shift)^2)} over [ja, jb).
template <class V>
struct ConvUnit {
  using T = typename V::T;
  const Tap<T>* taps;
  int ntaps;
  i64 cs, nci;
  const T* wp;
  i64 rows;
  const T* bias;
  T* out;
  i64 ostride;
  double* stats;
};

template <class V, int MR, int NV, int EPI>
FR_INLINE void conv_tile(const ConvUnit<V>& u, const typename V::T* wblk, i64 r0, i64 nr,
                         const typename V::reg (&bv)[MR], i64 j, i64 jb, bool masked,
                         typename V::reg (&sv)[MR], typename V::reg (&qv)[MR],
                         typename V::T (&shift)[MR], bool first) {
  using T = typename V::T;
  using reg = typename V::reg;
  constexpr int W = V::W;
  reg acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = bv[r];
  if (masked)
    conv_mk<V, MR, NV, true>(u.taps, u.ntaps, u.nci, u.cs, wblk, j, acc);
  else
    conv_mk<V, MR, NV, false>(u.taps, u.ntaps, u.nci, u.cs, wblk, j, acc);
  const i64 valid = jb - j;  // > (NV-1)*W
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r >= nr) break;
    T* o = u.out + (r0 + r) * u.ostride + j;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      reg val = acc[r][v];
      if (EPI == E_RELU) val = relu<V>(val);
      if (valid >= i64(v + 1) * W)
        V::store(o + v * W, val);
      else
        V::storem(o + v * W, val, V::range(0, int(valid - i64(v) * W)));
    }
    if (EPI == E_STATS) {
      if (first) {
        reg s = V::zero();
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          const reg val = valid >= i64(v + 1) * W
                              ? acc[r][v]
                              : V::maskz(V::range(0, int(valid - i64(v) * W)), acc[r][v]);
          s = V::add(s, val);
        }
        shift[r] = V::hsum(s) / T(imin(valid, i64(NV) * W));
      }
      const reg sh = V::set1(shift[r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        reg d = V::sub(acc[r][v], sh);
        if (valid < i64(v + 1) * W) d = V::maskz(V::range(0, int(valid - i64(v) * W)), d);
        sv[r] = V::add(sv[r], d);
        qv[r] = V::fma(d, d, qv[r]);
      }
    }
  }
}

template <class V, int EPI>
void conv_unit(const ConvUnit<V>& u, i64 ja, i64 jb) {
  using T = typename V::T;
  using reg = typename V::reg;
  constexpr int W = V::W, MR = V::MR, NR = V::NR, TW = NR * W;
  // Full tiles starting in [int_lo, int_hi] read no padding: plain loads.
  i64 int_lo = ja, int_hi = jb;
  for (int t = 0; t < u.ntaps; ++t) {
    int_lo = imax(int_lo, -u.taps[t].off);
    int_hi = imin(int_hi, u.taps[t].len - u.taps[t].off - TW);
  }
  const i64 ncb = cdiv(u.rows, MR);
  for (i64 cb = 0; cb < ncb; ++cb) {
    const T* wblk = u.wp + cb * u.ntaps * u.nci * MR;
    const i64 r0 = cb * MR, nr = imin(MR, u.rows - r0);
    reg bv[MR], sv[MR], qv[MR];
    T shift[MR];
    for (int r = 0; r < MR; ++r) {
      bv[r] = V::set1(u.bias && r < nr ? u.bias[r0 + r] : T(0));
      sv[r] = qv[r] = V::zero();
      shift[r] = T(0);
    }
    bool first = true;
    for (i64 j = ja; j < jb; j += TW) {
      const i64 rem = jb - j;
      if (rem >= TW) {
        conv_tile<V, MR, NR, EPI>(u, wblk, r0, nr, bv, j, jb, !(j >= int_lo && j <= int_hi), sv,
                                  qv, shift, first);
      } else {
        const int nv = int(cdiv(rem, W));
        if (NR >= 4 && nv == 3)
          conv_tile<V, MR, (NR >= 4 ? 3 : 1), EPI>(u, wblk, r0, nr, bv, j, jb, true, sv, qv, shift, first);
        else if (NR >= 3 && nv == 2)
          conv_tile<V, MR, (NR >= 3 ? 2 : 1), EPI>(u, wblk, r0, nr, bv, j, jb, true, sv, qv, shift, first);
        else if (nv == 1)
          conv_tile<V, MR, 1, EPI>(u, wblk, r0, nr, bv, j, jb, true, sv, qv, shift, first);
        else
          conv_tile<V, MR, NR, EPI>(u, wblk, r0, nr, bv, j, jb, true, sv, qv, shift, first);
      }
      first = false;
    }
    if (EPI == E_STATS) {
      for (i64 r = 0; r < nr; ++r) {
        double* st = u.stats + (r0 + r) * 3;
        st[0] = double(shift[r]);
        st[1] = double(V::hsum(sv[r]));
        st[2] = double(V::hsum(qv[r]));
      }
    }
  }
}

template <class V, int EPI>
void run_conv_unit(const ConvUnit<V>& u, i64 ja, i64 jb) {
  conv_unit<V, EPI>(u, ja, jb);
}

// Packs w viewed as W[g][o][i][k] (o < rows_g output rows, i < nci inputs, k over taps) into
// [g][cb][tap][i][MR]; `get(g, o, i, k)` returns the weight.
template <class V, typename F>
void pack_weights(typename V::T* wp, i64 G, i64 rows, i64 nci, int ntaps, const int* tapk,
                  F get) {
  constexpr int MR = V::MR;
  const i64 ncb = cdiv(rows, MR);
  for (i64 g = 0; g < G; ++g)
    for (i64 cb = 0; cb < ncb; ++cb)
      for (int t = 0; t < ntaps; ++t)
        for (i64 i = 0; i < nci; ++i)
          for (int r = 0; r < MR; ++r) {
            const i64 o = cb * MR + r;
            *wp++ = o < rows ? get(g, o, i, tapk[t]) : typename V::T(0);
          }
}

// Output-position chunking shared by the forward passes: a unit is (n, chunk).
struct Chunks {
  i64 CH, nch;
};
inline Chunks make_chunks(i64 N, i64 Lout, i64 tile, i64 bytes_per_pos) {
  i64 CH = imax(tile, (192 * 1024 / imax(bytes_per_pos, 1)) / tile * tile);
  CH = imin(CH, rup(Lout, tile));
  if (N * cdiv(Lout, CH) < 8) CH = imax(tile, rup(cdiv(Lout, cdiv(8, N)), tile));
  return Chunks{CH, cdiv(Lout, CH)};
}

// Inverse of deinterleave for positions q in [qa, qb): dst[c][q*S + r] =
// src[(r*C + c)*ld + q - qa] where q*S + r < L.
template <typename T>
void interleave(const T* src, i64 C, i64 ld, i64 qa, i64 qb, i64 S, i64 L, T* dst) {
  for (i64 c = 0; c < C; ++c) {
    T* d = dst + c * L;
    const i64 qfull = iclamp(L / S, qa, qb);
    if (S == 2) {
      const T* s0 = src + c * ld - qa;
      const T* s1 = src + (C + c) * ld - qa;
      for (i64 q = qa; q < qfull; ++q) {
        d[2 * q] = s0[q];
        d[2 * q + 1] = s1[q];
      }
    } else {
      for (i64 r = 0; r < S; ++r) {
        const T* sr = src + (r * C + c) * ld - qa;
        for (i64 q = qa; q < qfull; ++q) d[q * S + r] = sr[q];
      }
    }
    for (i64 r = 0; r < S; ++r) {
      const T* sr = src + (r * C + c) * ld - qa;
      for (i64 q = qfull; q < qb; ++q)
        if (q * S + r < L) d[q * S + r] = sr[q];
    }
  }
}

// Splits rows src[c][0..L) into S phases: dst[(r*C + c)*ld + q - qbeg] = src[c][q*S + r]
// (zero past L) for q in [qbeg, qend).
template <typename T>
void deinterleave(const T* src, i64 C, i64 L, i64 S, i64 qbeg, i64 qend, T* dst, i64 ld) {
  for (i64 c = 0; c < C; ++c) {
    const T* xr = src + c * L;
    // q below qfull has every phase inside the row
    const i64 qfull = iclamp(L / S, qbeg, qend);
    if (S == 2) {
      T* d0 = dst + c * ld - qbeg;
      T* d1 = dst + (C + c) * ld - qbeg;
      for (i64 q = qbeg; q < qfull; ++q) {
        d0[q] = xr[2 * q];
        d1[q] = xr[2 * q + 1];
      }
    } else {
      for (i64 r = 0; r < S; ++r) {
        T* d = dst + (r * C + c) * ld - qbeg;
        for (i64 q = qbeg; q < qfull; ++q) d[q] = xr[q * S + r];
      }
    }
    for (i64 r = 0; r < S; ++r) {
      T* d = dst + (r * C + c) * ld - qbeg;
      for (i64 q = qfull; q < qend; ++q) d[q] = q * S + r < L ? xr[q * S + r] : T(0);
    }
  }
}

// Forward conv over all units with the given epilogue. x: (N, Cin, L). wp packed per group.
// out: (N, Cout, Lout). stats: [unit][Cout][3] for E_STATS.
template <class V, int EPI>
void conv_forward_all(const Conv1dShape& s, const typename V::T* x, const typename V::T* wp,
                      const typename V::T* bias, typename V::T* out, double* stats,
                      const Chunks& ch) {
  using T = typename V::T;
  const i64 Lo = s.Lout(), G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G, K = s.K,
            S = s.stride;
  const i64 wgroup = cdiv(cout_g, V::MR) * V::MR * K * cin_g;
  const i64 nunits = s.N * ch.nch;
  // stride > 1: phase buffer geometry
  i64 dmin = 0, dmax = 0;
  for (i64 k = 0; k < K; ++k) {
    const i64 d = fdiv(k * s.dilation - s.pad, S);
    dmin = k ? imin(dmin, d) : d;
    dmax = k ? imax(dmax, d) : d;
  }
  const i64 Lq = cdiv(s.L, S);
  const i64 Wq = ch.CH + dmax - dmin + 1;
#pragma omp parallel if (worth_threads(s.N * s.Cout * Lo * cin_g * K))
  {
    Buf<T> ph(S > 1 ? s.Cin * S * Wq : 0);
    Tap<T> taps[64];
    Buf<Tap<T>> taps_big(K > 64 ? K : 0);
    Tap<T>* tp = K > 64 ? taps_big.p : taps;
#pragma omp for schedule(static)
    for (i64 u = 0; u < nunits; ++u) {
      const i64 n = u / ch.nch, ja = (u % ch.nch) * ch.CH, jb = imin(Lo, ja + ch.CH);
      i64 qbeg = 0, qend = 0;
      if (S > 1) {
        qbeg = imax(0, ja + dmin);
        qend = imin(Lq, jb + dmax);
        deinterleave(x + n * s.Cin * s.L, s.Cin, s.L, S, qbeg, qend, ph.p, Wq);
      }
      for (i64 g = 0; g < G; ++g) {
        for (i64 k = 0; k < K; ++k) {
          const i64 off = k * s.dilation - s.pad;
          if (S == 1) {
            tp[k] = Tap<T>{x + (n * s.Cin + g * cin_g) * s.L, off, s.L};
          } else {
            const i64 r = fmod_pos(off, S), d = fdiv(off, S);
            const i64 len_r = r < s.L ? cdiv(s.L - r, S) : 0;
            tp[k] = Tap<T>{ph.p + (r * s.Cin + g * cin_g) * Wq - qbeg, d, imin(len_r, qend)};
          }
        }
        ConvUnit<V> cu{tp, int(K), S == 1 ? s.L : Wq, cin_g, wp + g * wgroup, cout_g,
                       bias ? bias + g * cout_g : nullptr, out + (n * s.Cout + g * cout_g) * Lo,
                       Lo, stats ? stats + (u * s.Cout + g * cout_g) * 3 : nullptr};
        run_conv_unit<V, EPI>(cu, ja, jb);
      }
    }
  }
}

template <class V>
void pack_forward(const Conv1dShape& s, const typename V::T* w, typename V::T* wp) {
  const i64 G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G, K = s.K;
  Buf<int> tk(K);
  for (i64 k = 0; k < K; ++k) tk.p[k] = int(k);
  pack_weights<V>(wp, G, cout_g, cin_g, int(K), tk.p, [&](i64 g, i64 o, i64 i, int k) {
    return w[((g * cout_g + o) * cin_g + i) * K + k];
  });
}

template <class V>
i64 packed_size_forward(const Conv1dShape& s) {
  const i64 G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G;
  return G * cdiv(cout_g, V::MR) * V::MR * s.K * cin_g;
}

// y = relu(bn(z)) per channel (bn(z) without relu), parallel over rows. y may be z.
template <class V>
void normalize_relu(const Conv1dShape& s, const typename V::T* z, const typename V::T* gamma,
                    const typename V::T* beta, const typename V::T* mean,
                    const typename V::T* invstd, typename V::T* y, bool relu) {
  using T = typename V::T;
  constexpr int W = V::W;
  const i64 Lo = s.Lout(), rows = s.N * s.Cout;
#pragma omp parallel for schedule(static) if (worth_threads(2 * rows * Lo))
  for (i64 row = 0; row < rows; ++row) {
    const i64 co = row % s.Cout;
    const BnChannel<V> ch(gamma[co], beta[co], mean[co], invstd[co], relu);
    const T* zr = z + row * Lo;
    T* yr = y + row * Lo;
    i64 l = 0;
    for (; l + W <= Lo; l += W) V::store(yr + l, ch.out(V::load(zr + l)));
    if (l < Lo) {
      const auto m = V::range(0, int(Lo - l));
      V::storem(yr + l, ch.out(V::loadm(zr + l, m)), m);
    }
  }
}

template <typename T>
void forward_train_impl(const Conv1dShape& s, const T* x, const T* w, const T* bias,
                        const T* gamma, const T* beta, T* running_mean, T* running_var,
                        double eps, double momentum, bool use_batch_stats, T* z, T* mean,
                        T* invstd, T* y, bool relu) {
  using V = typename VecOf<T>::type;
  const i64 Lo = s.Lout();
  Buf<T> wp(packed_size_forward<V>(s));
  pack_forward<V>(s, w, wp.p);
  const Chunks ch = make_chunks(s.N, Lo, V::NR * V::W, s.Cin * s.stride * i64(sizeof(T)));
  const i64 nunits = s.N * ch.nch;
  if (use_batch_stats) {
    Buf<double> st(nunits * s.Cout * 3);
    conv_forward_all<V, E_STATS>(s, x, wp.p, bias, z, st.p, ch);
    const double M = double(s.N) * double(Lo);
    for (i64 co = 0; co < s.Cout; ++co) {
      double cnt = 0, mu = 0, m2 = 0;
      for (i64 u = 0; u < nunits; ++u) {
        const i64 ja = (u % ch.nch) * ch.CH, jb = imin(Lo, ja + ch.CH);
        const double nb = double(jb - ja);
        const double* q = st.p + (u * s.Cout + co) * 3;
        const double mb = q[0] + q[1] / nb;
        const double m2b = q[2] - q[1] * q[1] / nb > 0 ? q[2] - q[1] * q[1] / nb : 0.0;
        const double tot = cnt + nb, delta = mb - mu;
        mu += delta * nb / tot;
        m2 += m2b + delta * delta * cnt * nb / tot;
        cnt = tot;
      }
      const double var = m2 / M;
      mean[co] = static_cast<T>(mu);
      invstd[co] = static_cast<T>(1.0 / std::sqrt(var + eps));
      if (running_mean && running_var) {
        running_mean[co] = static_cast<T>(momentum * running_mean[co] + (1 - momentum) * mu);
        running_var[co] = static_cast<T>(momentum * running_var[co] + (1 - momentum) * var);
      }
    }
  } else {
    conv_forward_all<V, E_STORE>(s, x, wp.p, bias, z, nullptr, ch);
    for (i64 co = 0; co < s.Cout; ++co) {
      mean[co] = running_mean[co];
      invstd[co] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(running_var[co]) + eps));
    }
  }
  normalize_relu<V>(s, z, gamma, beta, mean, invstd, y, relu);
}

template <typename T>
void forward_infer_impl(const Conv1dShape& s, const T* x, const T* w, const T* bias,
                        const T* gamma, const T* beta, const T* running_mean,
                        const T* running_var, double eps, T* y, bool relu) {
  using V = typename VecOf<T>::type;
  const i64 G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G, K = s.K;
  Buf<double> scale(s.Cout);
  Buf<T> bf(s.Cout);
  bool finite = true;
  for (i64 co = 0; co < s.Cout; ++co) {
    scale.p[co] = gamma[co] / std::sqrt(static_cast<double>(running_var[co]) + eps);
    const double b0 = bias ? bias[co] : 0.0;
    bf.p[co] = static_cast<T>((b0 - running_mean[co]) * scale.p[co] + beta[co]);
    finite = finite && std::isfinite(bf.p[co]);
  }
  Buf<T> wp(packed_size_forward<V>(s));
  Buf<int> tk(K);
  for (i64 k = 0; k < K; ++k) tk.p[k] = int(k);
  pack_weights<V>(wp.p, G, cout_g, cin_g, int(K), tk.p, [&](i64 g, i64 o, i64 i, int k) {
    const i64 co = g * cout_g + o;
    const T v = static_cast<T>(w[(co * cin_g + i) * K + k] * scale.p[co]);
    finite = finite && std::isfinite(v);
    return v;
  });
  if (!finite) {
    // A scale or folded weight that is infinite or NaN (gamma = inf, a NaN statistic, ...):
    // fold nothing and normalize the conv output in BatchNorm's own order, which gives what
    // the stock blocks give. running_mean/var are only read (no batch statistics).
    Buf<T> mean(s.Cout), invstd(s.Cout);
    forward_train_impl<T>(s, x, w, bias, gamma, beta, const_cast<T*>(running_mean),
                          const_cast<T*>(running_var), eps, 0.0, false, y, mean.p, invstd.p, y,
                          relu);
    return;
  }
  const Chunks ch = make_chunks(s.N, s.Lout(), V::NR * V::W, s.Cin * s.stride * i64(sizeof(T)));
  if (relu)
    conv_forward_all<V, E_RELU>(s, x, wp.p, bf.p, y, nullptr, ch);
  else
    conv_forward_all<V, E_STORE>(s, x, wp.p, bf.p, y, nullptr, ch);
}

// ---------------------------------------------------------------------------------------------
// Backward

// Weight-gradient tile: acc[r][v] = sum_{l in [ja, jb)} dz_r[l] * xT[(l*S + off) * CP + v*W].
template <class V, int MR, int NV>
FR_INLINE void dw_tile(const typename V::T* const (&dzr)[MR], const typename V::T* xT, i64 CP,
                       i64 S, i64 ja, i64 jb, typename V::reg (&acc)[MR][NV]) {
  using reg = typename V::reg;
  constexpr int W = V::W;
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  const typename V::T* xp = xT + ja * S * CP;
  const i64 step = S * CP;
  for (i64 l = ja; l < jb; ++l) {
    reg xv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) xv[v] = V::load(xp + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const reg d = V::set1(dzr[r][l]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(d, xv[v], acc[r][v]);
    }
    xp += step;
  }
}

template <class V, int MR, int NV>
void dw_block_rows(const typename V::T* dz_g, i64 Lo, i64 r0, i64 nr, const typename V::T* xT,
                   i64 CP, i64 S, i64 ja, i64 jb, i64 civ, double* dst, i64 dst_row);

// MR x NV accumulator tile with MR = DMR * DNR / NV: fewer channel vectors, more rows.
template <class V, int NV>
void dw_block(const typename V::T* dz_g, i64 Lo, i64 rows, const typename V::T* xT, i64 CP,
              i64 S, i64 ja, i64 jb, i64 civ, double* dst, i64 dst_row) {
  constexpr int MR = V::DMR * V::DNR / NV;
  for (i64 r0 = 0; r0 < rows; r0 += MR)
    dw_block_rows<V, MR, NV>(dz_g, Lo, r0, imin(MR, rows - r0), xT, CP, S, ja, jb, civ, dst,
                             dst_row);
}

template <class V, int MR, int NV>
void dw_block_rows(const typename V::T* dz_g, i64 Lo, i64 r0, i64 nr,
                             const typename V::T* xT, i64 CP, i64 S, i64 ja, i64 jb, i64 civ,
                             double* dst, i64 dst_row) {
  using T = typename V::T;
  constexpr int W = V::W;
  const T* dzr[MR];
  for (int r = 0; r < MR; ++r) dzr[r] = dz_g + (r0 + (r < nr ? r : 0)) * Lo;
  typename V::reg acc[MR][NV];
  dw_tile<V, MR, NV>(dzr, xT + civ * W, CP, S, ja, jb, acc);
  alignas(64) T tmp[MR][NV * W];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) V::store(&tmp[r][v * W], acc[r][v]);
  for (int r = 0; r < MR; ++r) {
    if (r >= nr) break;
    double* d = dst + (r0 + r) * dst_row + civ * W;
    const T* t = tmp[r];
    for (int i = 0; i < NV * W; ++i) d[i] += double(t[i]);
  }
}

template <typename T>
void backward_impl(const Conv1dShape& s, bool batch_stats, const T* dy, const T* x, const T* w,
                   const T* z, const T* gamma, const T* beta, const T* mean, const T* invstd,
                   T* dx, T* dw, T* dbias, T* dgamma, T* dbeta, bool relu) {
  using V = typename VecOf<T>::type;
  using reg = typename V::reg;
  constexpr int W = V::W;
  const i64 Lo = s.Lout(), M = s.N * Lo, rows = s.N * s.Cout;
  const i64 G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G, K = s.K, S = s.stride;
  const bool need_dz = dx || dw || dbias;
  if (!(need_dz || dgamma || dbeta)) return;

  // bn_bwd_reduce: per row sum(g), sum(g * xhat), g = dy * relu'(pre) (g = dy without relu).
  Buf<double> part(rows * 2);
#pragma omp parallel for schedule(static) if (worth_threads(2 * rows * Lo))
  for (i64 row = 0; row < rows; ++row) {
    const i64 co = row % s.Cout;
    const BnChannel<V> ch(gamma[co], beta[co], mean[co], invstd[co], relu);
    const reg muv = V::set1(mean[co]), isv = V::set1(invstd[co]);
    const T* zr = z + row * Lo;
    const T* gr = dy + row * Lo;
    double sg = 0, sgx = 0;
    for (i64 l0 = 0; l0 < Lo; l0 += 1024) {
      const i64 l1 = imin(Lo, l0 + 1024);
      reg s1 = V::zero(), s2 = V::zero();
      i64 l = l0;
      for (; l + W <= l1; l += W) {
        const reg zv = V::load(zr + l);
        const reg g = ch.grad(zv, V::load(gr + l));
        s1 = V::add(s1, g);
        s2 = V::fma(g, V::mul(V::sub(zv, muv), isv), s2);
      }
      if (l < l1) {
        const auto m = V::range(0, int(l1 - l));
        const reg zv = V::loadm(zr + l, m);
        // lanes past the row stay 0 (pre of a zero lane may be NaN)
        const reg g = V::maskz(m, ch.grad(zv, V::loadm(gr + l, m)));
        s1 = V::add(s1, g);
        s2 = V::fma(g, V::mul(V::sub(zv, muv), isv), s2);
      }
      sg += double(V::hsum(s1));
      sgx += double(V::hsum(s2));
    }
    part.p[row * 2] = sg;
    part.p[row * 2 + 1] = sgx;
  }
  Buf<double> sg(s.Cout), sgx(s.Cout);
  for (i64 co = 0; co < s.Cout; ++co) {
    double a = 0, b = 0;
    for (i64 n = 0; n < s.N; ++n) {
      a += part.p[(n * s.Cout + co) * 2];
      b += part.p[(n * s.Cout + co) * 2 + 1];
    }
    sg.p[co] = a;
    sgx.p[co] = b;
    if (dgamma) dgamma[co] = static_cast<T>(b);
    if (dbeta) dbeta[co] = static_cast<T>(a);
  }
  if (!need_dz) return;

  // bn_bwd_dz: dz = scale * g - k0 - k1 * (z - mean), with row sums for the bias gradient.
  T* dz = workspace<T>(rows * Lo);
#pragma omp parallel for schedule(static) if (worth_threads(2 * rows * Lo))
  for (i64 row = 0; row < rows; ++row) {
    const i64 co = row % s.Cout;
    const BnChannel<V> ch(gamma[co], beta[co], mean[co], invstd[co], relu);
    const T is = invstd[co], scale = gamma[co] * is;
    const double mg = batch_stats ? sg.p[co] / double(M) : 0.0;
    const double mgx = batch_stats ? sgx.p[co] / double(M) : 0.0;
    const reg muv = V::set1(mean[co]), scv = V::set1(scale);
    const reg k0 = V::set1(static_cast<T>(double(scale) * mg));
    const reg nk1 = V::set1(static_cast<T>(-double(scale) * double(is) * mgx));
    // With running statistics the batch terms vanish; they are left out rather than
    // multiplied by 0, which an infinite z would turn into NaN.
    auto dz_of = [&](reg g, reg zv) {
      return batch_stats ? V::fma(scv, g, V::fma(V::sub(zv, muv), nk1, V::sub(V::zero(), k0)))
                         : V::mul(scv, g);
    };
    const T* zr = z + row * Lo;
    const T* gr = dy + row * Lo;
    T* dr = dz + row * Lo;
    double sdz = 0;
    for (i64 l0 = 0; l0 < Lo; l0 += 1024) {
      const i64 l1 = imin(Lo, l0 + 1024);
      reg s1 = V::zero();
      i64 l = l0;
      for (; l + W <= l1; l += W) {
        const reg zv = V::load(zr + l);
        const reg g = ch.grad(zv, V::load(gr + l));
        const reg d = dz_of(g, zv);
        V::store(dr + l, d);
        s1 = V::add(s1, d);
      }
      if (l < l1) {
        const auto m = V::range(0, int(l1 - l));
        const reg zv = V::loadm(zr + l, m);
        const reg g = ch.grad(zv, V::loadm(gr + l, m));
        const reg d = V::maskz(m, dz_of(g, zv));
        V::storem(dr + l, d, m);
        s1 = V::add(s1, d);
      }
      sdz += double(V::hsum(s1));
    }
    part.p[row * 2] = sdz;
  }
  if (dbias)
    for (i64 co = 0; co < s.Cout; ++co) {
      double a = 0;
      for (i64 n = 0; n < s.N; ++n) a += part.p[(n * s.Cout + co) * 2];
      dbias[co] = static_cast<T>(a);
    }

  // conv_bwd_data: dx = conv_transpose(dz, w): a forward conv of dz (Cout_g inputs) to Cin_g outputs, one
  // output phase at a time when stride > 1 (phase r gets the taps with
  // (r + pad - k*dil) % stride == 0, at dz offset (r + pad - k*dil) / stride).
  if (dx) {
    constexpr int MR = V::MR;
    const i64 nph = S;
    const i64 Lq0 = cdiv(s.L, S);
    const Chunks ch = make_chunks(s.N, Lq0, V::NR * W, s.Cout * i64(sizeof(T)));
    const i64 wgroup = cdiv(cin_g, MR) * MR * K * cout_g;
    Buf<T> wt(nph * G * wgroup);
    Buf<int> ntap(nph), tapk(nph * K);
    for (i64 r = 0; r < nph; ++r) {
      int nt = 0;
      for (i64 k = 0; k < K; ++k)
        if (fmod_pos(r + s.pad - k * s.dilation, S) == 0) tapk.p[r * K + nt++] = int(k);
      ntap.p[r] = nt;
      for (i64 g = 0; g < G; ++g)
        pack_weights<V>(wt.p + (r * G + g) * wgroup, 1, cin_g, cout_g, nt, tapk.p + r * K,
                        [&](i64, i64 o, i64 i, int k) {
                          return w[((g * cout_g + i) * cin_g + o) * K + k];
                        });
    }
    const i64 nunits = s.N * ch.nch;
#pragma omp parallel if (worth_threads(s.N * s.Cout * Lo * cin_g * K))
    {
      Buf<T> tmp(S > 1 ? S * s.Cin * ch.CH : 0);
      Tap<T> taps[64];
      Buf<Tap<T>> taps_big(K > 64 ? K : 0);
      Tap<T>* tp = K > 64 ? taps_big.p : taps;
#pragma omp for schedule(static)
      for (i64 u = 0; u < nunits; ++u) {
        const i64 n = u / ch.nch, ja = (u % ch.nch) * ch.CH;
        for (i64 r = 0; r < nph; ++r) {
          const i64 Lq = r < s.L ? cdiv(s.L - r, S) : 0;
          const i64 jb = imin(Lq, ja + ch.CH);
          if (ja >= jb) continue;
          const int nt = ntap.p[r];
          for (i64 g = 0; g < G; ++g) {
            T* out = S == 1 ? dx + (n * s.Cin + g * cin_g) * s.L
                            : tmp.p + (r * s.Cin + g * cin_g) * ch.CH - ja;
            const i64 ostride = S == 1 ? s.L : ch.CH;
            if (nt == 0) {
              for (i64 i = 0; i < cin_g; ++i)
                for (i64 j = ja; j < jb; ++j) out[i * ostride + j] = T(0);
              continue;
            }
            for (int t = 0; t < nt; ++t) {
              const i64 k = tapk.p[r * K + t];
              tp[t] = Tap<T>{dz + (n * s.Cout + g * cout_g) * Lo,
                             (r + s.pad - k * s.dilation) / S, Lo};
            }
            ConvUnit<V> cu{tp, nt, Lo, cout_g, wt.p + (r * G + g) * wgroup, cin_g, nullptr,
                           out, ostride, nullptr};
            run_conv_unit<V, E_STORE>(cu, ja, jb);
          }
        }
        if (S > 1) interleave(tmp.p, s.Cin, ch.CH, ja, imin(ja + ch.CH, Lq0), S, s.L,
                              dx + n * s.Cin * s.L);
      }
    }
  }

  // conv_bwd_weight: dw[co, ci, k] = sum_{n, l} dz[n, co, l] * x[n, ci, l*S + k*dil - pad], with x transposed
  // per unit into xT[p][ci] (ci padded to CP with zeros, p outside [0, L) zero).
  if (dw) {
    constexpr int DNR = V::DNR;
    const i64 CP = rup(cin_g, W);
    const i64 offmin = -s.pad, offmax = (K - 1) * s.dilation - s.pad;
    i64 CHw = imax(16, imin(512, (128 * 1024) / (CP * i64(sizeof(T)) * S)));
    CHw = imin(CHw, Lo);
    if (s.N * cdiv(Lo, CHw) < 8) CHw = imax(1, cdiv(Lo, cdiv(8, s.N)));
    const i64 nch = cdiv(Lo, CHw), nunits = s.N * nch;
    const i64 dst_row = K * CP;  // per co: [k][CP]
    const int nthr = omp_get_max_threads();
    Buf<double> acc(i64(nthr) * s.Cout * dst_row);
    std::memset(acc.p, 0, sizeof(double) * size_t(i64(nthr) * s.Cout * dst_row));
    const i64 xrows = (CHw - 1) * S + offmax - offmin + 1;
    int used = 1;
#pragma omp parallel if (worth_threads(s.N * s.Cout * Lo * cin_g * K))
    {
      const int tid = omp_get_thread_num();
#pragma omp single
      used = omp_get_num_threads();
      Buf<T> xT(xrows * CP);
      double* mine = acc.p + i64(tid) * s.Cout * dst_row;
#pragma omp for schedule(static)
      for (i64 u = 0; u < nunits; ++u) {
        const i64 n = u / nch, ja = (u % nch) * CHw, jb = imin(Lo, ja + CHw);
        const i64 pb = ja * S + offmin, pe = (jb - 1) * S + offmax + 1;
        for (i64 g = 0; g < G; ++g) {
          // transpose x[n, g*cin_g + ci, p] for p in [pb, pe)
          const T* xg = x + (n * s.Cin + g * cin_g) * s.L;
          // blocks of 16 positions: contiguous reads per channel (a column walk over rows
          // L apart would alias in L1 when L is a multiple of 1024 floats)
          for (i64 p0 = pb; p0 < pe; p0 += W) {
            const i64 p1 = imin(pe, p0 + W);
            const i64 va = iclamp(p0, 0, s.L), vb = iclamp(p1, 0, s.L);  // valid [va, vb)
            for (i64 p = p0; p < p1; ++p)
              if (p < va || p >= vb)
                for (i64 ci = 0; ci < CP; ++ci) xT.p[(p - pb) * CP + ci] = T(0);
            i64 c0 = 0;
            if (V::TRANSPOSE && p1 - p0 == W && va == p0 && vb == p1)
              for (; c0 + W <= cin_g; c0 += W)
                V::transpose(xg + c0 * s.L + p0, s.L, xT.p + (p0 - pb) * CP + c0, CP);
            for (i64 ci = c0; ci < cin_g; ++ci) {
              const T* src = xg + ci * s.L;
              T* dst = xT.p + ci - pb * CP;
              for (i64 p = va; p < vb; ++p) dst[p * CP] = src[p];
            }
            for (i64 p = va; p < vb; ++p)
              for (i64 ci = cin_g; ci < CP; ++ci) xT.p[(p - pb) * CP + ci] = T(0);
          }
          const T* dz_g = dz + (n * s.Cout + g * cout_g) * Lo;
          double* dst_g = mine + g * cout_g * dst_row;
          const i64 nvec = CP / W;
          for (i64 k = 0; k < K; ++k) {
            // xT row of position l*S + off is (l*S + off - pb); shift the base so index l*S*CP works
            const T* xk = xT.p + (k * s.dilation - s.pad - pb) * CP;
            double* dk = dst_g + k * CP;
            for (i64 civ = 0; civ < nvec; civ += DNR) {
              const i64 nv = imin(DNR, nvec - civ);
              if (nv == DNR)
                dw_block<V, DNR>(dz_g, Lo, cout_g, xk, CP, S, ja, jb, civ, dk, dst_row);
              else if (DNR > 3 && nv == 3)
                dw_block<V, (DNR > 3 ? 3 : 1)>(dz_g, Lo, cout_g, xk, CP, S, ja, jb, civ, dk, dst_row);
              else if (DNR > 2 && nv == 2)
                dw_block<V, (DNR > 2 ? 2 : 1)>(dz_g, Lo, cout_g, xk, CP, S, ja, jb, civ, dk, dst_row);
              else
                dw_block<V, 1>(dz_g, Lo, cout_g, xk, CP, S, ja, jb, civ, dk, dst_row);
            }
          }
        }
      }
    }
    // reduce thread partials in thread order
    const i64 total = s.Cout * dst_row;
    for (int t = 1; t < used; ++t) {
      const double* src = acc.p + i64(t) * total;
      for (i64 i = 0; i < total; ++i) acc.p[i] += src[i];
    }
    for (i64 co = 0; co < s.Cout; ++co)
      for (i64 ci = 0; ci < cin_g; ++ci)
        for (i64 k = 0; k < K; ++k)
          dw[(co * cin_g + ci) * K + k] = static_cast<T>(acc.p[co * dst_row + k * CP + ci]);
  }
}

}  // namespace

#define FUSEDRES_ISA_DEFINE(T)                                                                \
  void forward_train(const Conv1dShape& s, const T* x, const T* w, const T* bias,              \
                     const T* gamma, const T* beta, T* rm, T* rv, double eps, double mom,      \
                     bool ubs, T* z, T* mean, T* invstd, T* y, bool relu) {                     \
    forward_train_impl<T>(s, x, w, bias, gamma, beta, rm, rv, eps, mom, ubs, z, mean, invstd,  \
                          y, relu);                                                             \
  }                                                                                             \
  void forward_infer(const Conv1dShape& s, const T* x, const T* w, const T* bias,              \
                     const T* gamma, const T* beta, const T* rm, const T* rv, double eps,      \
                     T* y, bool relu) {                                                         \
    forward_infer_impl<T>(s, x, w, bias, gamma, beta, rm, rv, eps, y, relu);                    \
  }                                                                                             \
  void backward(const Conv1dShape& s, bool bs, const T* dy, const T* x, const T* w,            \
                const T* z, const T* gamma, const T* beta, const T* mean, const T* invstd,     \
                T* dx, T* dw, T* dbias, T* dgamma, T* dbeta, bool relu) {                       \
    backward_impl<T>(s, bs, dy, x, w, z, gamma, beta, mean, invstd, dx, dw, dbias, dgamma,      \
                     dbeta, relu);                                                              \
  }

FUSEDRES_ISA_DEFINE(float)
FUSEDRES_ISA_DEFINE(double)

}  // namespace FUSEDRES_ISA_NS
}  // namespace fusedres
