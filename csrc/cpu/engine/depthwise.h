// Depthwise convolutions: groups == input channels, so output row co reads the one input row
// ci = co / m (m = Cout / Cin, the channel multiplier). The dense engine would spend its
// MR-row register tile on that single row (an MR-fold waste) and pass over memory once per
// step; here each row is a direct convolution vectorized along the width (RNR vectors of
// positions, one multiply-add per tap and vector), and the work goes a channel at a time: its
// conv rows, statistics and normalization (forward), its batchnorm gradient, dz, weight and
// data gradients (backward), while the channel's rows are in cache.
// Part of the conv engine (conv_engine.h): compiled once per instruction set, inside that
// translation unit's namespace, after isa_traits.h; not a header of its own.
#pragma once
#include "backward.h"
#include "forward.h"

namespace fusedres {
namespace FUSEDRES_ISA_NS {
namespace {

// The shapes this path takes: one input channel per group and a small multiplier (a large one
// fills the dense engine's register tile with the multiplier's rows).
FR_INLINE bool depthwise(const Conv1dShape& s) {
  return s.Cin == s.groups && s.Cout / s.groups <= 8;
}

// out[j .. j + valid) of one row: bias + sum_t w[t] * tap_t(j), relu'd when RELU.
template <class V, int NV, bool MASKED, bool RELU>
FR_INLINE void row_tile(const Tap<typename V::T>* taps, int ntaps, const typename V::T* w,
                        typename V::reg bias, i64 j, i64 valid, typename V::T* out) {
  constexpr int W = V::W;
  typename V::reg acc[1][NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) acc[0][v] = bias;
  conv_mk<V, 1, NV, MASKED>(taps, ntaps, 1, 0, w, j, acc);
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const typename V::reg val = RELU ? relu<V>(acc[0][v]) : acc[0][v];
    if (valid >= i64(v + 1) * W)
      V::store(out + j + v * W, val);
    else
      V::storem(out + j + v * W, val, V::range(0, int(imax(valid - i64(v) * W, 0))));
  }
}

// One row conv: out[j] = bias + sum_t w[t] * tap_t(j) for j in [0, len).
template <class V, bool RELU>
void conv_row(const Tap<typename V::T>* taps, int ntaps, const typename V::T* w, typename V::T bias,
              typename V::T* out, i64 len) {
  constexpr int W = V::W, NV = V::RNR, TW = NV * W, NV4 = NV < 4 ? NV : 4;
  // Full tiles starting in [int_lo, int_hi] read no padding: plain loads.
  i64 int_lo = 0, int_hi = len;
  for (int t = 0; t < ntaps; ++t) {
    int_lo = imax(int_lo, -taps[t].off);
    int_hi = imin(int_hi, taps[t].len - taps[t].off - TW);
  }
  const typename V::reg bv = V::set1(bias);
  i64 j = 0;
  for (; j + TW <= len; j += TW) {
    if (j >= int_lo && j <= int_hi)
      row_tile<V, NV, false, RELU>(taps, ntaps, w, bv, j, TW, out);
    else
      row_tile<V, NV, true, RELU>(taps, ntaps, w, bv, j, TW, out);
  }
  while (j < len) {
    const i64 rem = len - j;
    if (rem > W) {
      row_tile<V, NV4, true, RELU>(taps, ntaps, w, bv, j, imin(rem, i64(NV4) * W), out);
      j += NV4 * W;
    } else {
      row_tile<V, 1, true, RELU>(taps, ntaps, w, bv, j, rem, out);
      j += W;
    }
  }
}

// sum += sum(z - shift), sq += sum((z - shift)^2) over one row (float vectors flushed to double
// every 1024 positions).
template <class V>
FR_INLINE void row_moments(const typename V::T* zr, i64 len, typename V::T shift, double* sum,
                           double* sq) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  const reg sh = V::set1(shift);
  for (i64 l0 = 0; l0 < len; l0 += 1024) {
    const i64 l1 = imin(len, l0 + 1024);
    reg s1 = V::zero(), s2 = V::zero();
    i64 l = l0;
    for (; l + W <= l1; l += W) {
      const reg d = V::sub(V::load(zr + l), sh);
      s1 = V::add(s1, d);
      s2 = V::fma(d, d, s2);
    }
    if (l < l1) {
      const auto m = V::range(0, int(l1 - l));
      const reg d = V::maskz(m, V::sub(V::loadm(zr + l, m), sh));
      s1 = V::add(s1, d);
      s2 = V::fma(d, d, s2);
    }
    *sum += double(V::hsum(s1));
    *sq += double(V::hsum(s2));
  }
}

template <typename T>
void dw_forward_train(const Conv1dShape& s, const T* x, const T* w, const T* bias, const T* gamma,
                      const T* beta, T* running_mean, T* running_var, double eps, double momentum,
                      bool batch_stats, T* z, T* mean, T* invstd, T* y, bool relu) {
  using V = typename VecOf<T>::type;
  const i64 Lo = s.Lout(), K = s.K, m = s.Cout / s.Cin, S = s.stride;
  const double M = double(s.N) * double(Lo);
#pragma omp parallel if (worth_threads(s.N * s.Cout * Lo * K))
  {
    Buf<T> ph(S > 1 ? S * cdiv(s.L, S) : 0);
    Buf<Tap<T>> taps(K);
#pragma omp for schedule(static)
    for (i64 co = 0; co < s.Cout; ++co) {
      const i64 ci = co / m;
      double shift = 0, sum = 0, sq = 0;
      for (i64 n = 0; n < s.N; ++n) {
        T* zr = z + (n * s.Cout + co) * Lo;
        row_taps(s, x + (n * s.Cin + ci) * s.L, ph.p, taps.p);
        conv_row<V, false>(taps.p, int(K), w + co * K, bias ? bias[co] : T(0), zr, Lo);
        if (batch_stats) {
          // Moments about the mean of the channel's first row (in cache: one more pass over
          // it), close to the channel's mean: no cancellation in sq - sum^2 / M. Not a single
          // value: with padding the first one is an edge, far from the mean. A row mean that
          // is not finite (an infinite z) shifts by 0, so the mean comes out as the reference's.
          if (n == 0) {
            double s0 = 0, q0 = 0;
            row_moments<V>(zr, Lo, T(0), &s0, &q0);
            shift = std::isfinite(s0) ? double(T(s0 / double(Lo))) : 0.0;
          }
          row_moments<V>(zr, Lo, T(shift), &sum, &sq);
        }
      }
      if (batch_stats) {
        const double mu = shift + sum / M, d = sq - sum * sum / M;
        const double var = (d > 0 ? d : (d == d ? 0.0 : d)) / M;
        batch_stats_of(co, mu, var, eps, momentum, mean, invstd, running_mean, running_var);
      } else {
        running_stats_of(co, eps, running_mean, running_var, mean, invstd);
      }
      const BnChannel<V> ch(gamma[co], beta[co], mean[co], invstd[co], relu);
      for (i64 n = 0; n < s.N; ++n)
        normalize_row<V>(ch, z + (n * s.Cout + co) * Lo, y + (n * s.Cout + co) * Lo, Lo);
    }
  }
}

template <typename T>
void dw_forward_infer(const Conv1dShape& s, const T* x, const T* w, const T* bias, const T* gamma,
                      const T* beta, const T* running_mean, const T* running_var, double eps, T* y,
                      bool relu) {
  using V = typename VecOf<T>::type;
  const i64 Lo = s.Lout(), K = s.K, m = s.Cout / s.Cin, S = s.stride;
  Buf<double> scale(s.Cout);
  Buf<T> bf(s.Cout), wf(s.Cout * K);
  bool finite = fold_bn(s, bias, gamma, beta, running_mean, running_var, eps, scale.p, bf.p);
  for (i64 i = 0; i < s.Cout * K; ++i) {
    wf.p[i] = static_cast<T>(w[i] * scale.p[i / K]);
    finite = finite && std::isfinite(wf.p[i]);
  }
  if (!finite) {
    // As forward_infer_impl: fold nothing, normalize in BatchNorm's own order.
    Buf<T> mean(s.Cout), invstd(s.Cout);
    dw_forward_train<T>(s, x, w, bias, gamma, beta, const_cast<T*>(running_mean),
                        const_cast<T*>(running_var), eps, 0.0, false, y, mean.p, invstd.p, y, relu);
    return;
  }
  const i64 rows = s.N * s.Cout;
#pragma omp parallel if (worth_threads(rows * Lo * K))
  {
    Buf<T> ph(S > 1 ? S * cdiv(s.L, S) : 0);
    Buf<Tap<T>> taps(K);
#pragma omp for schedule(static)
    for (i64 row = 0; row < rows; ++row) {
      const i64 n = row / s.Cout, co = row % s.Cout;
      row_taps(s, x + (n * s.Cin + co / m) * s.L, ph.p, taps.p);
      if (relu)
        conv_row<V, true>(taps.p, int(K), wf.p + co * K, bf.p[co], y + row * Lo, Lo);
      else
        conv_row<V, false>(taps.p, int(K), wf.p + co * K, bf.p[co], y + row * Lo, Lo);
    }
  }
}

// One row of the data gradient: dxr[p] = sum_k wr[k] * dz[(p + pad - k*dil) / S] over the taps
// whose division is exact, one output phase at a time when S > 1 (phases written to ph and
// interleaved into dxr).
template <class V>
void dw_data_row(const Conv1dShape& s, const typename V::T* dzr, const typename V::T* wr,
                 typename V::T* dxr, typename V::T* ph, Tap<typename V::T>* taps,
                 typename V::T* tw) {
  using T = typename V::T;
  const i64 Lo = s.Lout(), S = s.stride, Lq = cdiv(s.L, S);
  for (i64 r = 0; r < imin(S, s.L); ++r) {
    int nt = 0;
    for (i64 k = 0; k < s.K; ++k) {
      const i64 e = r + s.pad - k * s.dilation;
      if (fmod_pos(e, S) != 0) continue;
      taps[nt] = Tap<T>{dzr, fdiv(e, S), Lo};
      tw[nt++] = wr[k];
    }
    T* out = S == 1 ? dxr : ph + r * Lq;
    const i64 len = cdiv(s.L - r, S);
    if (nt == 0)
      std::memset(out, 0, size_t(len) * sizeof(T));
    else
      conv_row<V, false>(taps, nt, tw, T(0), out, len);
  }
  if (S > 1) interleave(ph, 1, Lq, 0, Lq, S, s.L, dxr);
}

template <typename T>
void dw_backward(const Conv1dShape& s, bool batch_stats, const T* dy, const T* x, const T* w,
                 const T* z, const T* gamma, const T* beta, const T* mean, const T* invstd, T* dx,
                 T* dw, T* dbias, T* dgamma, T* dbeta, bool relu) {
  using V = typename VecOf<T>::type;
  const bool need_dz = dx || dw || dbias;
  if (!(need_dz || dgamma || dbeta)) return;
  const i64 Lo = s.Lout(), K = s.K, m = s.Cout / s.Cin, S = s.stride, L = s.L;
  const double M = double(s.N) * double(Lo);
  // Parallel over input channels: the m output channels of one input row write its dx row.
#pragma omp parallel if (worth_threads(s.N * s.Cout * Lo * K))
  {
    const i64 phase_len = S > 1 ? S * cdiv(L, S) : 0;
    Buf<T> ph(phase_len), dph(phase_len), dzr(need_dz ? Lo : 0), tmp(dx && m > 1 ? L : 0);
    Buf<T> tw(K);
    Buf<Tap<T>> taps(K), dtaps(K);
    Buf<double> dwk(K);
#pragma omp for schedule(static)
    for (i64 ci = 0; ci < s.Cin; ++ci) {
      for (i64 j = 0; j < m; ++j) {
        const i64 co = ci * m + j;
        const BnChannel<V> ch(gamma[co], beta[co], mean[co], invstd[co], relu);
        double sg = 0, sgx = 0;
        for (i64 n = 0; n < s.N; ++n) {
          double part[2];
          const i64 row = (n * s.Cout + co) * Lo;
          bn_reduce_row<V>(ch, mean[co], invstd[co], z + row, dy + row, Lo, part);
          sg += part[0];
          sgx += part[1];
        }
        if (dgamma) dgamma[co] = static_cast<T>(sgx);
        if (dbeta) dbeta[co] = static_cast<T>(sg);
        if (!need_dz) continue;
        const BnGrad<V> bg(gamma[co], mean[co], invstd[co], batch_stats, sg, sgx, M);
        double db = 0;
        for (i64 k = 0; k < K; ++k) dwk.p[k] = 0;
        for (i64 n = 0; n < s.N; ++n) {
          const i64 row = (n * s.Cout + co) * Lo;
          db += bn_dz_row<V>(ch, bg, z + row, dy + row, dzr.p, Lo);
          if (dw) {
            row_taps(s, x + (n * s.Cin + ci) * L, ph.p, taps.p);
            tap_dots<V>(dzr.p, Lo, taps.p, K, dwk.p);
          }
          if (dx) {
            T* dxr = dx + (n * s.Cin + ci) * L;
            if (j == 0) {
              dw_data_row<V>(s, dzr.p, w + co * K, dxr, dph.p, dtaps.p, tw.p);
            } else {
              dw_data_row<V>(s, dzr.p, w + co * K, tmp.p, dph.p, dtaps.p, tw.p);
              for (i64 p = 0; p < L; ++p) dxr[p] += tmp.p[p];
            }
          }
        }
        if (dbias) dbias[co] = static_cast<T>(db);
        if (dw)
          for (i64 k = 0; k < K; ++k) dw[co * K + k] = static_cast<T>(dwk.p[k]);
      }
    }
  }
}

}  // namespace
}  // namespace FUSEDRES_ISA_NS
}  // namespace fusedres
