// The backward passes (named as the CUDA kernels are) and backward_impl, which runs them.
// Part of the conv engine (conv_engine.h): compiled once per instruction set, inside that
// translation unit's namespace, after isa_traits.h; not a header of its own.
#pragma once
#include <omp.h>

#include "conv_tiles.h"

namespace fusedres {
namespace FUSEDRES_ISA_NS {
namespace {

// The batch items a weight-gradient tile sums over in float: nn items, item i's dz rows
// dz_step after item 0's and its transposed input xT_step after; assign: the tile's sums are
// written over its double sums rather than added to them (their first run: no zeroing pass).
// conv_bwd_weight relies on every dw_window call covering all of its rows x K x CP sums: a
// call skipped or cut short on a first run would leave them uninitialized.
struct DwItems {
  i64 nn = 1, dz_step = 0, xT_step = 0;
  bool assign = false;
};

// Weight-gradient tile: acc[r][v] = sum_{l in [ja, jb)} dz_r[l] * xT[(l*S + off) * CP + v*W],
// summed over the items `it` when MULTI (else over the first only).
template <class V, int MR, int NV, bool MULTI>
FR_INLINE void dw_tile(const typename V::T* const (&dzr)[MR], const typename V::T* xT, i64 CP,
                       i64 S, i64 ja, i64 jb, const DwItems& it, typename V::reg (&acc)[MR][NV]) {
  using reg = typename V::reg;
  constexpr int W = V::W;
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  const i64 step = S * CP;
  for (i64 i = 0; i < (MULTI ? it.nn : 1); ++i) {
    const typename V::T* xp = xT + (MULTI ? i * it.xT_step : 0) + ja * S * CP;
    const typename V::T* d_r[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) d_r[r] = dzr[r] + (MULTI ? i * it.dz_step : 0);
    for (i64 l = ja; l < jb; ++l) {
      reg xv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) xv[v] = V::load(xp + v * W);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const reg d = V::set1(d_r[r][l]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(d, xv[v], acc[r][v]);
      }
      xp += step;
    }
  }
}

template <class V, int MR, int NV, bool MULTI>
void dw_block_rows(const typename V::T* dz_g, i64 Lo, i64 r0, i64 nr, const typename V::T* xT,
                   i64 CP, i64 S, i64 ja, i64 jb, i64 civ, double* dst, i64 dst_row,
                   const DwItems& it);

// MR x NV accumulator tile with MR = DMR * DNR / NV: fewer channel vectors, more rows.
template <class V, int NV, bool MULTI = false>
void dw_block(const typename V::T* dz_g, i64 Lo, i64 rows, const typename V::T* xT, i64 CP, i64 S,
              i64 ja, i64 jb, i64 civ, double* dst, i64 dst_row, const DwItems& it = DwItems{}) {
  constexpr int MR = V::DMR * V::DNR / NV;
  for (i64 r0 = 0; r0 < rows; r0 += MR)
    dw_block_rows<V, MR, NV, MULTI>(dz_g, Lo, r0, imin(MR, rows - r0), xT, CP, S, ja, jb, civ, dst,
                                    dst_row, it);
}

template <class V, int MR, int NV, bool MULTI>
void dw_block_rows(const typename V::T* dz_g, i64 Lo, i64 r0, i64 nr, const typename V::T* xT,
                   i64 CP, i64 S, i64 ja, i64 jb, i64 civ, double* dst, i64 dst_row,
                   const DwItems& it) {
  using T = typename V::T;
  constexpr int W = V::W;
  const T* dzr[MR];
  for (int r = 0; r < MR; ++r) dzr[r] = dz_g + (r0 + (r < nr ? r : 0)) * Lo;
  typename V::reg acc[MR][NV];
  dw_tile<V, MR, NV, MULTI>(dzr, xT + civ * W, CP, S, ja, jb, it, acc);
  alignas(64) T tmp[MR][NV * W];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) V::store(&tmp[r][v * W], acc[r][v]);
  for (int r = 0; r < MR; ++r) {
    if (r >= nr) break;
    double* d = dst + (r0 + r) * dst_row + civ * W;
    const T* t = tmp[r];
    if (it.assign)
      for (int i = 0; i < NV * W; ++i) d[i] = double(t[i]);
    else
      for (int i = 0; i < NV * W; ++i) d[i] += double(t[i]);
  }
}

// The backward, pass by pass as the CUDA kernels name them: bn_bwd_reduce, bn_bwd_dz,
// conv_bwd_data, conv_bwd_weight.

// Per-channel sums of what reaches the batchnorm from above.
struct BnSums {
  Buf<double> g, gx;  // sum(g), sum(g * xhat) over (N, Lout), g = dy * relu'(pre)
  explicit BnSums(i64 channels) : g(channels), gx(channels) {}
};

// One row of bn_bwd_reduce: part[0] = sum(g), part[1] = sum(g * xhat) with g = dy * relu'(pre),
// in float vectors flushed to double every 1024 positions.
template <class V>
FR_INLINE void bn_reduce_row(const BnChannel<V>& ch, typename V::T mean, typename V::T invstd,
                             const typename V::T* zr, const typename V::T* gr, i64 Lo,
                             double* part) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  const reg muv = V::set1(mean), isv = V::set1(invstd);
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
  part[0] = sg;
  part[1] = sgx;
}

// One channel's dz = scale * g - k0 - k1 * (z - mean) (batch statistics), or scale * g
// (running ones), from the sums of bn_bwd_reduce over `count` positions.
template <class V>
struct BnGrad {
  using T = typename V::T;
  using reg = typename V::reg;
  bool batch_stats;
  reg muv, scv, k0, nk1;
  BnGrad(T gamma, T mean, T invstd, bool batch_stats_, double sum_g, double sum_gx, double count)
      : batch_stats(batch_stats_) {
    const T scale = gamma * invstd;
    const double mg = batch_stats ? sum_g / count : 0.0;
    const double mgx = batch_stats ? sum_gx / count : 0.0;
    muv = V::set1(mean);
    scv = V::set1(scale);
    k0 = V::set1(static_cast<T>(double(scale) * mg));
    nk1 = V::set1(static_cast<T>(-double(scale) * double(invstd) * mgx));
  }
  // With running statistics the batch terms vanish; they are left out rather than
  // multiplied by 0, which an infinite z would turn into NaN.
  FR_INLINE reg dz(reg g, reg zv) const {
    return batch_stats ? V::fma(scv, g, V::fma(V::sub(zv, muv), nk1, V::sub(V::zero(), k0)))
                       : V::mul(scv, g);
  }
};

// One row of bn_bwd_dz: writes dz, returns its sum (the row's share of the bias gradient).
template <class V>
FR_INLINE double bn_dz_row(const BnChannel<V>& ch, const BnGrad<V>& bg, const typename V::T* zr,
                           const typename V::T* gr, typename V::T* dr, i64 Lo) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  double sdz = 0;
  for (i64 l0 = 0; l0 < Lo; l0 += 1024) {
    const i64 l1 = imin(Lo, l0 + 1024);
    reg s1 = V::zero();
    i64 l = l0;
    for (; l + W <= l1; l += W) {
      const reg zv = V::load(zr + l);
      const reg d = bg.dz(ch.grad(zv, V::load(gr + l)), zv);
      V::store(dr + l, d);
      s1 = V::add(s1, d);
    }
    if (l < l1) {
      const auto m = V::range(0, int(l1 - l));
      const reg zv = V::loadm(zr + l, m);
      const reg d = V::maskz(m, bg.dz(ch.grad(zv, V::loadm(gr + l, m)), zv));
      V::storem(dr + l, d, m);
      s1 = V::add(s1, d);
    }
    sdz += double(V::hsum(s1));
  }
  return sdz;
}

template <typename T>
void bn_bwd_reduce(const Conv1dShape& s, const T* dy, const T* z, const T* gamma, const T* beta,
                   const T* mean, const T* invstd, bool relu, BnSums* sums, T* dgamma, T* dbeta) {
  using V = typename VecOf<T>::type;
  const i64 Lo = s.Lout(), rows = s.N * s.Cout;
  // Per row, then per channel in a fixed order (results do not depend on the thread count).
  Buf<double> part(rows * 2);
#pragma omp parallel for schedule(static) if (worth_threads(2 * rows * Lo))
  for (i64 row = 0; row < rows; ++row) {
    const i64 co = row % s.Cout;
    const BnChannel<V> ch(gamma[co], beta[co], mean[co], invstd[co], relu);
    bn_reduce_row<V>(ch, mean[co], invstd[co], z + row * Lo, dy + row * Lo, Lo, part.p + row * 2);
  }
  for (i64 co = 0; co < s.Cout; ++co) {
    double a = 0, b = 0;
    for (i64 n = 0; n < s.N; ++n) {
      a += part.p[(n * s.Cout + co) * 2];
      b += part.p[(n * s.Cout + co) * 2 + 1];
    }
    sums->g.p[co] = a;
    sums->gx.p[co] = b;
    if (dgamma) dgamma[co] = static_cast<T>(b);
    if (dbeta) dbeta[co] = static_cast<T>(a);
  }
}

// dz = scale * g - k0 - k1 * (z - mean) (batch statistics), or scale * g (running ones); the
// bias gradient is the sum of dz.
template <typename T>
void bn_bwd_dz(const Conv1dShape& s, bool batch_stats, const T* dy, const T* z, const T* gamma,
               const T* beta, const T* mean, const T* invstd, bool relu, const BnSums& sums, T* dz,
               T* dbias) {
  using V = typename VecOf<T>::type;
  const i64 Lo = s.Lout(), M = s.N * Lo, rows = s.N * s.Cout;
  Buf<double> part(rows);
#pragma omp parallel for schedule(static) if (worth_threads(2 * rows * Lo))
  for (i64 row = 0; row < rows; ++row) {
    const i64 co = row % s.Cout;
    const BnChannel<V> ch(gamma[co], beta[co], mean[co], invstd[co], relu);
    const BnGrad<V> bg(gamma[co], mean[co], invstd[co], batch_stats, sums.g.p[co], sums.gx.p[co],
                       double(M));
    part.p[row] = bn_dz_row<V>(ch, bg, z + row * Lo, dy + row * Lo, dz + row * Lo, Lo);
  }
  if (dbias)
    for (i64 co = 0; co < s.Cout; ++co) {
      double a = 0;
      for (i64 n = 0; n < s.N; ++n) a += part.p[n * s.Cout + co];
      dbias[co] = static_cast<T>(a);
    }
}

// The data gradient's weights for one stride phase, every group: w as [i][o][k] (the
// transposed conv) packed over the phase's nt taps tapk, dgrad_wgroup<V>(s) per group.
template <class V>
i64 dgrad_wgroup(const Conv1dShape& s) {
  const i64 cin_g = s.Cin / s.groups, cout_g = s.Cout / s.groups;
  return cdiv(cin_g, V::MR) * V::MR * s.K * cout_g;
}
template <class V>
void pack_dgrad_weights(const Conv1dShape& s, int nt, const int* tapk, const typename V::T* w,
                        typename V::T* wt) {
  const i64 G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G, K = s.K;
  for (i64 g = 0; g < G; ++g)
    pack_weights<V>(wt + g * dgrad_wgroup<V>(s), 1, cin_g, cout_g, nt, tapk,
                    w + g * cout_g * cin_g * K, 0, K, cin_g * K);
}

template <typename T>
void conv_bwd_data(const Conv1dShape& s, const T* dz, const T* w, T* dx) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  const i64 Lo = s.Lout();
  const i64 G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G, K = s.K, S = s.stride;
  // conv_bwd_data: dx = conv_transpose(dz, w): a forward conv of dz (Cout_g inputs) to Cin_g
  // outputs, one output phase at a time when stride > 1 (phase r gets the taps with (r + pad -
  // k*dil) % stride == 0, at dz offset (r + pad - k*dil) / stride).
  const i64 nph = S;
  const i64 Lq0 = cdiv(s.L, S);
  const Chunks ch = make_chunks<V>(s.N, Lq0, s.Cout * i64(sizeof(T)));
  const i64 wgroup = dgrad_wgroup<V>(s);
  Buf<T> wt(nph * G * wgroup);
  Buf<int> ntap(nph), tapk(nph * K);
  for (i64 r = 0; r < nph; ++r) {
    int nt = 0;
    for (i64 k = 0; k < K; ++k)
      if (fmod_pos(r + s.pad - k * s.dilation, S) == 0) tapk.p[r * K + nt++] = int(k);
    ntap.p[r] = nt;
    pack_dgrad_weights<V>(s, nt, tapk.p + r * K, w, wt.p + r * G * wgroup);
  }
  const i64 nunits = s.N * ch.nch;
  // dz rows that alias in L1 are staged per unit (stage_taps); a phase's taps span at most
  // (K - 1) * dilation / S + 1 positions of dz
  constexpr i64 TW = V::NR * W;
  const bool stage = rows_alias(Lo * i64(sizeof(T)), cout_g);
  const i64 ldz = alias_free_ld<T>(ch.CH + TW + (K - 1) * s.dilation / S + 1);
#pragma omp parallel if (worth_threads(s.N * s.Cout * Lo * cin_g * K))
  {
    Buf<T> tmp(S > 1 ? S * s.Cin * ch.CH : 0);
    Buf<T> zs(stage ? cout_g * ldz : 0);
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
            tp[t] =
                Tap<T>{dz + (n * s.Cout + g * cout_g) * Lo, (r + s.pad - k * s.dilation) / S, Lo};
          }
          const i64 cs = stage ? stage_taps(tp, nt, cout_g, Lo, ja, jb, TW, zs.p, ldz) : Lo;
          ConvUnit<V> cu{tp,    nt,      cs,  cout_g,  wt.p + (r * G + g) * wgroup,
                         cin_g, nullptr, out, ostride, nullptr};
          run_conv_unit<V, E_STORE>(cu, ja, jb);
        }
      }
      if (S > 1)
        interleave(tmp.p, s.Cin, ch.CH, ja, imin(ja + ch.CH, Lq0), S, s.L, dx + n * s.Cin * s.L);
    }
  }
}

// xT[(p - pb) * CP + ci] = xg[ci * L + p] for p in [pb, pe), ci < cin_g; zero for p outside
// [0, L) and for ci in [cin_g, CP).
template <class V>
FR_INLINE void transpose_window(const typename V::T* xg, i64 L, i64 cin_g, i64 CP, i64 pb, i64 pe,
                                typename V::T* xT) {
  using T = typename V::T;
  constexpr int W = V::W;
  const i64 va = iclamp(pb, 0, L), vb = iclamp(pe, va, L);  // valid [va, vb)
  for (i64 p = pb; p < pe; ++p)
    if (p < va || p >= vb)
      std::memset(xT + (p - pb) * CP, 0, sizeof(T) * size_t(CP));
    else if (cin_g < CP)
      std::memset(xT + (p - pb) * CP + cin_g, 0, sizeof(T) * size_t(CP - cin_g));
  // W channels at a time, each of their rows read in order: W streams from memory (all
  // cin_g rows at once measured 0.2 ms slower at the reference shape, 2 threads).
  i64 c0 = 0;
  if (V::TRANSPOSE)
    for (; c0 + W <= cin_g; c0 += W) {
      i64 p = va;
      for (; p + W <= vb; p += W) V::transpose(xg + c0 * L + p, L, xT + (p - pb) * CP + c0, CP);
      for (; p < vb; ++p)
        for (i64 ci = c0; ci < c0 + W; ++ci) xT[(p - pb) * CP + ci] = xg[ci * L + p];
    }
  for (i64 ci = c0; ci < cin_g; ++ci) {
    const T* src = xg + ci * L;
    T* dst = xT + ci - pb * CP;
    for (i64 p = va; p < vb; ++p) dst[p * CP] = src[p];
  }
}

// One group's weight-gradient tiles over rows [0, rows) of dz_g (row stride ldz, indexed by
// position) and positions [ja, jb), xT's row of position p at (p - pb):
// dst[r * dst_row + k * CP + ci] += their float sums.
template <class V, bool MULTI>
FR_INLINE void dw_window(const Conv1dShape& s, const typename V::T* dz_g, i64 ldz, i64 rows,
                         const typename V::T* xT, i64 CP, i64 pb, i64 ja, i64 jb, double* dst,
                         i64 dst_row, const DwItems& it) {
  using T = typename V::T;
  constexpr int DNR = V::DNR;
  const i64 S = s.stride, nvec = CP / V::W;
  for (i64 k = 0; k < s.K; ++k) {
    // xT row of position l*S + off is (l*S + off - pb); shift the base so index l*S*CP works
    const T* xk = xT + (k * s.dilation - s.pad - pb) * CP;
    double* dk = dst + k * CP;
    for (i64 civ = 0; civ < nvec; civ += DNR) {
      const i64 nv = imin(DNR, nvec - civ);
      if (nv == DNR)
        dw_block<V, DNR, MULTI>(dz_g, ldz, rows, xk, CP, S, ja, jb, civ, dk, dst_row, it);
      else if (DNR > 3 && nv == 3)
        dw_block<V, (DNR > 3 ? 3 : 1), MULTI>(dz_g, ldz, rows, xk, CP, S, ja, jb, civ, dk, dst_row,
                                              it);
      else if (DNR > 2 && nv == 2)
        dw_block<V, (DNR > 2 ? 2 : 1), MULTI>(dz_g, ldz, rows, xk, CP, S, ja, jb, civ, dk, dst_row,
                                              it);
      else
        dw_block<V, 1, MULTI>(dz_g, ldz, rows, xk, CP, S, ja, jb, civ, dk, dst_row, it);
    }
  }
}

// dw from `used` threads' partial sums (each [Cout][K][CP], one after another): added in thread
// order, per output channel (rows in parallel).
template <typename T>
void dw_from_partials(const Conv1dShape& s, double* acc, int used, i64 CP, T* dw) {
  const i64 cin_g = s.Cin / s.groups, K = s.K, dst_row = K * CP, total = s.Cout * dst_row;
#pragma omp parallel for schedule(static) if (i64(used) * total >= (i64(1) << 16))
  for (i64 co = 0; co < s.Cout; ++co) {
    double* row = acc + co * dst_row;
    for (int t = 1; t < used; ++t) {
      const double* src = row + i64(t) * total;
      for (i64 i = 0; i < dst_row; ++i) row[i] += src[i];
    }
    for (i64 ci = 0; ci < cin_g; ++ci)
      for (i64 k = 0; k < K; ++k) dw[(co * cin_g + ci) * K + k] = static_cast<T>(row[k * CP + ci]);
  }
}

template <typename T>
void conv_bwd_weight(const Conv1dShape& s, const T* dz, const T* x, T* dw) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  const i64 Lo = s.Lout();
  const i64 G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G, K = s.K, S = s.stride;
  // conv_bwd_weight: dw[co, ci, k] = sum_{n, l} dz[n, co, l] * x[n, ci, l*S + k*dil - pad], with x
  // transposed per unit into xT[p][ci] (ci padded to CP with zeros, p outside [0, L) zero).
  const i64 CP = rup(cin_g, W);
  const i64 offmin = -s.pad, offmax = (K - 1) * s.dilation - s.pad;
  const i64 dst_row = K * CP;  // per co: [k][CP]
  const int nthr = omp_get_max_threads();
  i64 CHw = imax(16, imin(512, (128 * 1024) / (CP * i64(sizeof(T)) * S)));
  CHw = imin(CHw, Lo);
  // Few chunks of positions (small batch) or short rows: the threads split the output channels
  // (ranges of a multiple of RB rows, the rows of a full-width dw_block tile) instead of the
  // positions; each range is summed over every position by one thread, into its own rows of
  // one set of sums. Short rows are summed in float over several batch items (nb) at a time,
  // up to 512 positions, as a chunk of a long row is: one flush of the double sums per run
  // instead of one per item. Only where those sums outgrow L2 (1 MiB here), whose flushes then
  // go to memory: A/B in one process, 2 threads, AVX-512, the backward of (16, 512, 32) -> 512
  // k3 0.87x, (16, 256, 64) -> 512 k3 s2 0.91x, (1, 256, 256) -> 256 k3 0.92x; with small sums,
  // (16, 64, 256) -> 128 k1 s2, it measured 1.08x.
  constexpr i64 RB = V::DMR;
  const bool few = s.N * cdiv(Lo, CHw) < 8, short_rows = CHw == Lo && Lo <= 128 && s.N > 1;
  const bool big_sums = s.Cout * dst_row * i64(sizeof(double)) > (i64(1) << 20);
  const bool row_split = nthr > 1 && (few || short_rows) && big_sums && cout_g >= 2 * RB;
  if (!row_split && few) CHw = imax(1, cdiv(Lo, cdiv(8, s.N)));
  const i64 xrows = (CHw - 1) * S + offmax - offmin + 1;
  const i64 nb =
      row_split && CHw == Lo
          ? iclamp(imin(512 / Lo, (i64(512) << 10) / (xrows * CP * i64(sizeof(T)))), 1, s.N)
          : 1;
  const i64 nch = cdiv(Lo, CHw), nunits = s.N * nch;  // the default split's units
  const i64 rrows = row_split ? rup(cdiv(cout_g, i64(nthr)), RB) : cout_g;
  const i64 nrs = cdiv(cout_g, rrows);
  // Each thread's sums are written by its first run over them (DwItems::assign), not zeroed
  // first: a serial memset of (16, 512, 32) -> 512 k3's 6 MiB took 5% of its backward and left
  // the other thread waiting.
  Buf<double> acc(i64(row_split ? 1 : nthr) * s.Cout * dst_row);
  int used = 1;
#pragma omp parallel if (worth_threads(s.N * s.Cout * Lo * cin_g * K))
  {
    Buf<T> xT(nb * xrows * CP);
    if (row_split) {
      // item (g, rows [r0, r0 + rrows)): every run of nb items x a chunk, into the shared sums
      // (rows disjoint)
#pragma omp for schedule(static)
      for (i64 item = 0; item < G * nrs; ++item) {
        const i64 g = item / nrs, r0 = (item % nrs) * rrows, nr = imin(rrows, cout_g - r0);
        for (i64 n0 = 0; n0 < s.N; n0 += nb)
          for (i64 ja = 0; ja < Lo; ja += CHw) {
            const i64 nn = imin(nb, s.N - n0), jb = imin(Lo, ja + CHw);
            const i64 pb = ja * S + offmin, pe = (jb - 1) * S + offmax + 1;
            for (i64 i = 0; i < nn; ++i)
              transpose_window<V>(x + ((n0 + i) * s.Cin + g * cin_g) * s.L, s.L, cin_g, CP, pb, pe,
                                  xT.p + i * xrows * CP);
            dw_window<V, true>(s, dz + (n0 * s.Cout + g * cout_g + r0) * Lo, Lo, nr, xT.p, CP, pb,
                               ja, jb, acc.p + (g * cout_g + r0) * dst_row, dst_row,
                               DwItems{nn, s.Cout * Lo, xrows * CP, n0 == 0 && ja == 0});
          }
      }
    } else {
      const int tid = omp_get_thread_num();
#pragma omp single
      used = omp_get_num_threads();
      double* mine = acc.p + i64(tid) * s.Cout * dst_row;
      bool fresh = true;  // every unit covers all of the sums: a thread's first writes them
#pragma omp for schedule(static)
      for (i64 u = 0; u < nunits; ++u) {
        const i64 n = u / nch, ja = (u % nch) * CHw, jb = imin(Lo, ja + CHw);
        const i64 pb = ja * S + offmin, pe = (jb - 1) * S + offmax + 1;
        for (i64 g = 0; g < G; ++g) {
          transpose_window<V>(x + (n * s.Cin + g * cin_g) * s.L, s.L, cin_g, CP, pb, pe, xT.p);
          dw_window<V, false>(s, dz + (n * s.Cout + g * cout_g) * Lo, Lo, cout_g, xT.p, CP, pb, ja,
                              jb, mine + g * cout_g * dst_row, dst_row, DwItems{1, 0, 0, fresh});
        }
        fresh = false;
      }
      if (fresh) std::memset(mine, 0, sizeof(double) * size_t(s.Cout * dst_row));  // no units
    }
  }
  dw_from_partials(s, acc.p, used, CP, dw);
}

// The backward's three passes over dz in one, for stride 1: per unit (batch item, chunk
// [ja, jb) of dx positions) and group, dz is computed from dy and z (bn_bwd_dz's formula) into
// the window the data gradient's taps read (as stage_taps would copy it, zero outside
// [0, Lout)), the data gradient runs from it, and the weight gradient sums it against the
// input over the unit's share [la, lb) of dz positions (the shares partition [0, Lout)). dz is
// never written out and read back twice: at (32, 64, 1024) -> 64 k3 (AVX2, 2 threads) the
// separate passes cost 2.7 ms of a 12.4 ms backward, against 9.7 ms for the two convolutions
// alone. Same dz values as bn_bwd_dz; the weight gradient sums them in another order (per
// unit, per-thread double sums added in thread order), the bias gradient per unit in unit
// order. Needs pad <= (K - 1) * dilation (the last unit's window then holds every dz position
// past it).
// Whether the weight gradient goes by the row tiles (conv_bwd_weight_rows) rather than the
// tiles over the transposed input: up to a vector of input channels per group on AVX-512 and
// for float64, half of one for AVX2 float (A/B of the two paths in one build, 2 threads,
// AVX-512: float32 (32,32,1024) k3 tiles 1.06 ms, rows 1.60; float64 (16,8,4096) -> 32 k5 s2
// rows 1.91, tiles 3.06, 16 channels about even; AVX2 float32 (16,8,4096) k5 s2 rows 1.61,
// tiles 1.22; AVX2 float64 4 channels rows 0.13, tiles 0.23).
template <typename T>
bool dw_by_rows(const Conv1dShape& s) {
  using V = typename VecOf<T>::type;
  constexpr i64 rows_max = V::DMR == 6 || sizeof(T) == 8 ? V::W : V::W / 2;
  return s.Cin / s.groups <= rows_max;
}

template <typename T>
bool backward_units_fit(const Conv1dShape& s, bool want_dw) {
  using V = typename VecOf<T>::type;
  const i64 cin_g = s.Cin / s.groups, CP = rup(cin_g, V::W);
  if (s.stride != 1 || s.pad > (s.K - 1) * s.dilation) return false;
  if (!want_dw) return true;
  // The weight gradient as conv_bwd_weight's default split does it: not by the row tiles, and
  // per-thread sums that stay in L2.
  return !dw_by_rows<T>(s) && s.Cout * s.K * CP * i64(sizeof(double)) <= (i64(512) << 10);
}

template <typename T>
void backward_units(const Conv1dShape& s, bool batch_stats, const T* dy, const T* x, const T* w,
                    const T* z, const T* gamma, const T* beta, const T* mean, const T* invstd,
                    bool relu, const BnSums& sums, T* dx, T* dw, T* dbias) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  constexpr i64 TW = V::NR * W;
  const i64 Lo = s.Lout(), M = s.N * Lo;
  const i64 G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G, K = s.K, dil = s.dilation;
  const i64 CP = rup(cin_g, W), dst_row = K * CP;
  // dx position j reads dz at j + pad - k*dil: tap offsets in [omin, omax]
  const i64 omin = s.pad - (K - 1) * dil, omax = s.pad;
  const i64 bytes_per_pos = (cout_g + (dw ? CP : 0)) * i64(sizeof(T));
  const Chunks ch = make_chunks<V>(s.N, s.L, bytes_per_pos);
  const i64 ldz = alias_free_ld<T>(ch.CH + TW + omax - omin);
  const i64 xrows = ch.CH + s.pad + (K - 1) * dil;  // the longest share plus the taps' span
  const i64 wgroup = dgrad_wgroup<V>(s);
  Buf<T> wt(dx ? G * wgroup : 0);
  Buf<int> tapk(K);
  for (i64 k = 0; k < K; ++k) tapk.p[k] = int(k);
  if (dx) pack_dgrad_weights<V>(s, int(K), tapk.p, w, wt.p);
  const i64 nunits = s.N * ch.nch;
  const int nthr = omp_get_max_threads();
  Buf<double> acc(dw ? i64(nthr) * s.Cout * dst_row : 0);
  Buf<double> part(nunits * s.Cout);  // per unit and channel: sum of dz over the unit's share
  int used = 1;
#pragma omp parallel if (worth_threads(s.N * s.Cout * Lo * cin_g * K))
  {
    Buf<T> zs(cout_g * ldz);
    Buf<T> xT(dw ? xrows * CP : 0);
    Tap<T> taps[64];
    Buf<Tap<T>> taps_big(K > 64 ? K : 0);
    Tap<T>* tp = K > 64 ? taps_big.p : taps;
    const int tid = omp_get_thread_num();
#pragma omp single
    used = omp_get_num_threads();
    double* mine = dw ? acc.p + i64(tid) * s.Cout * dst_row : nullptr;
    if (dw) std::memset(mine, 0, sizeof(double) * size_t(s.Cout * dst_row));
#pragma omp for schedule(static)
    for (i64 u = 0; u < nunits; ++u) {
      const i64 n = u / ch.nch, c = u % ch.nch, ja = c * ch.CH, jb = imin(s.L, ja + ch.CH);
      // this unit's share of dz positions
      const i64 la = c == 0 ? 0 : iclamp(ja + omin, 0, Lo);
      const i64 lb = c + 1 == ch.nch ? Lo : iclamp(jb + omin, 0, Lo);
      // the window [q0, q0 + nq) the data gradient's tiles read: [la, qb) of it inside the row
      // (la = max(q0, 0)), the share first
      const i64 q0 = ja + omin, nq = jb - ja + TW + omax - omin, qb = iclamp(q0 + nq, la, Lo);
      for (i64 g = 0; g < G; ++g) {
        for (i64 r = 0; r < cout_g; ++r) {
          const i64 co = g * cout_g + r, row = (n * s.Cout + co) * Lo;
          const BnChannel<V> bc(gamma[co], beta[co], mean[co], invstd[co], relu);
          const BnGrad<V> bg(gamma[co], mean[co], invstd[co], batch_stats, sums.g.p[co],
                             sums.gx.p[co], double(M));
          T* d = zs.p + r * ldz - q0;  // d[q] is dz at position q
          std::fill(d + q0, d + la, T(0));
          part.p[u * s.Cout + co] =
              bn_dz_row<V>(bc, bg, z + row + la, dy + row + la, d + la, lb - la);
          bn_dz_row<V>(bc, bg, z + row + lb, dy + row + lb, d + lb, qb - lb);
          std::fill(d + qb, d + q0 + nq, T(0));
        }
        if (dx) {
          for (i64 k = 0; k < K; ++k) tp[k] = Tap<T>{zs.p - ja, s.pad - k * dil - omin, ja + nq};
          ConvUnit<V> cu{tp,
                         int(K),
                         ldz,
                         cout_g,
                         wt.p + g * wgroup,
                         cin_g,
                         nullptr,
                         dx + (n * s.Cin + g * cin_g) * s.L,
                         s.L,
                         nullptr};
          run_conv_unit<V, E_STORE>(cu, ja, jb);
        }
        if (dw && la < lb) {
          const i64 pb = la - s.pad, pe = lb - 1 + (K - 1) * dil - s.pad + 1;
          transpose_window<V>(x + (n * s.Cin + g * cin_g) * s.L, s.L, cin_g, CP, pb, pe, xT.p);
          // float sums over at most 512 positions before each flush to double, as
          // conv_bwd_weight's chunks (a share of few channels can be thousands long)
          for (i64 l0 = la; l0 < lb; l0 += 512)
            dw_window<V, false>(s, zs.p - q0, ldz, cout_g, xT.p, CP, pb, l0, imin(lb, l0 + 512),
                                mine + g * cout_g * dst_row, dst_row, DwItems{});
        }
      }
    }
  }
  if (dbias)
    for (i64 co = 0; co < s.Cout; ++co) {
      double a = 0;
      for (i64 u = 0; u < nunits; ++u) a += part.p[u * s.Cout + co];
      dbias[co] = static_cast<T>(a);
    }
  if (dw) dw_from_partials(s, acc.p, used, CP, dw);
}

// Zero-padded phases of one input row: ph[r * Lq + q] = x[q*S + r - pad] for q in [0, Lq), 0
// outside [0, L). Tap k over output positions l is then the contiguous window
// ph[((k*dil) % S) * Lq + (k*dil) / S + l].
template <typename T>
void padded_phases(const Conv1dShape& s, const T* xr, i64 Lq, T* ph) {
  const i64 S = s.stride;
  for (i64 r = 0; r < S; ++r) {
    // q*S + r - pad inside [0, L) for q in [qa, qb)
    const i64 qa = iclamp(cdiv(imax(s.pad - r, 0), S), 0, Lq);
    const i64 qb = iclamp(s.L + s.pad - r > 0 ? cdiv(s.L + s.pad - r, S) : 0, qa, Lq);
    T* d = ph + r * Lq;
    for (i64 q = 0; q < qa; ++q) d[q] = T(0);
    if (S == 1 && qb > qa)
      std::memcpy(d + qa, xr + qa - s.pad, size_t(qb - qa) * sizeof(T));
    else if (S > 1)
      for (i64 q = qa; q < qb; ++q) d[q] = xr[q * S + r - s.pad];
    for (i64 q = qb; q < Lq; ++q) d[q] = T(0);
  }
}

// acc[o][k] += dz_o[l] * win_k[l] over l in [0, Lo), lane-wise (OB dz rows against KB tap
// windows: OB + KB loads for OB * KB multiply-adds).
template <class V, int OB, int KB>
FR_INLINE void wrows_acc(const typename V::T* const (&dzr)[OB],
                         const typename V::T* const (&win)[KB], i64 Lo,
                         typename V::reg (&acc)[OB][KB]) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  i64 l = 0;
  for (; l + W <= Lo; l += W) {
    reg xv[KB];
#pragma GCC unroll 8
    for (int k = 0; k < KB; ++k) xv[k] = V::load(win[k] + l);
#pragma GCC unroll 8
    for (int o = 0; o < OB; ++o) {
      const reg d = V::load(dzr[o] + l);
#pragma GCC unroll 8
      for (int k = 0; k < KB; ++k) acc[o][k] = V::fma(d, xv[k], acc[o][k]);
    }
  }
  if (l < Lo) {
    // both masked: a zero dz lane against an infinite x lane past the row would be NaN
    const auto m = V::range(0, int(Lo - l));
    reg xv[KB];
#pragma GCC unroll 8
    for (int k = 0; k < KB; ++k) xv[k] = V::loadm(win[k] + l, m);
#pragma GCC unroll 8
    for (int o = 0; o < OB; ++o) {
      const reg d = V::loadm(dzr[o] + l, m);
#pragma GCC unroll 8
      for (int k = 0; k < KB; ++k) acc[o][k] = V::fma(d, xv[k], acc[o][k]);
    }
  }
}

// One (OB outputs x KB taps) tile of conv_bwd_weight_rows over the nn rows of a row block:
// float vectors over at most 1024 positions (the block's rows, or 1024 of one long row), then
// dst[o * ostride + k] += their sums in double.
template <class V, int OB, int KB>
void wrows_tile(const typename V::T* const* dz_rows, i64 dz_step, const typename V::T* ph,
                i64 ph_step, const i64* win_off, i64 nn, i64 Lo, double* dst, i64 ostride, int no) {
  using T = typename V::T;
  constexpr i64 CHUNK = 1024;  // a multiple of every W: only a row's last chunk has a tail
  for (i64 l0 = 0; l0 < Lo; l0 += CHUNK) {
    const i64 len = imin(CHUNK, Lo - l0);
    typename V::reg acc[OB][KB];
#pragma GCC unroll 8
    for (int o = 0; o < OB; ++o)
#pragma GCC unroll 8
      for (int k = 0; k < KB; ++k) acc[o][k] = V::zero();
    for (i64 i = 0; i < nn; ++i) {
      const T* dzr[OB];
      const T* win[KB];
      for (int o = 0; o < OB; ++o) dzr[o] = dz_rows[o] + i * dz_step + l0;
      for (int k = 0; k < KB; ++k) win[k] = ph + i * ph_step + win_off[k] + l0;
      wrows_acc<V, OB, KB>(dzr, win, len, acc);
    }
    for (int o = 0; o < no; ++o)
      for (int k = 0; k < KB; ++k) dst[o * ostride + k] += double(V::hsum(acc[o][k]));
  }
}

// wrows_tile for kb = 1 .. KB taps.
template <class V, int OB, int KB>
void wrows_tile_kb(int kb, const typename V::T* const* dz_rows, i64 dz_step,
                   const typename V::T* ph, i64 ph_step, const i64* win_off, i64 nn, i64 Lo,
                   double* dst, i64 ostride, int no) {
  if constexpr (KB > 1) {
    if (kb < KB)
      return wrows_tile_kb<V, OB, KB - 1>(kb, dz_rows, dz_step, ph, ph_step, win_off, nn, Lo, dst,
                                          ostride, no);
  }
  wrows_tile<V, OB, KB>(dz_rows, dz_step, ph, ph_step, win_off, nn, Lo, dst, ostride, no);
}

// conv_bwd_weight for groups of few input channels (the transposed-input tile of
// conv_bwd_weight would be mostly padding): dw[co, ci, k] = sum over n and l of dz[n, co, l] *
// tap k of input row (n, ci) at l, in register tiles of OB output rows x KB taps over the
// zero-padded phases of the input rows, a block of output channels per work item (the items own
// disjoint weights, and each sums in a fixed order: deterministic for any thread count).
template <typename T>
void conv_bwd_weight_rows(const Conv1dShape& s, const T* dz, const T* x, T* dw) {
  using V = typename VecOf<T>::type;
  // KB + OB * KB + 1 vector registers (the taps, the sums, a dz vector): 31 of AVX-512's 32
  // (4 x 6), 13 of AVX2's 16 (3 x 3).
  constexpr int OB = V::DNR, KB = V::DMR == 6 ? 6 : V::DMR - 1;
  const i64 Lo = s.Lout(), G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G, K = s.K;
  const i64 S = s.stride, Lq = Lo + (K - 1) * s.dilation / S + 1;
  // Output channels per item: 8, fewer when that leaves a thread without an item.
  i64 CB = 8;
  while (CB > 1 && G * cdiv(cout_g, CB) < omp_get_max_threads()) CB /= 2;
  const i64 ncb = cdiv(cout_g, CB), items = G * ncb;
  // Rows summed in float per tile: about 1024 positions (as row_dot; a longer row in chunks of
  // 1024), at least one row, and their phases in at most 256 Ki elements unless one row is more.
  const i64 nb = imax(1, imin(imin(s.N, 1024 / imax(Lo, 1)), (i64(256) << 10) / (S * Lq)));
#pragma omp parallel if (worth_threads(s.N * s.Cout * Lo * cin_g * K))
  {
    Buf<T> ph(nb * S * Lq);
    Buf<double> acc(CB * cin_g * K);
    Buf<i64> win_off(K);
    for (i64 k = 0; k < K; ++k) win_off.p[k] = (k * s.dilation) % S * Lq + (k * s.dilation) / S;
#pragma omp for schedule(static)
    for (i64 it = 0; it < items; ++it) {
      const i64 g = it / ncb, o0 = (it % ncb) * CB, no = imin(CB, cout_g - o0);
      std::memset(acc.p, 0, sizeof(double) * size_t(CB * cin_g * K));
      for (i64 ci = 0; ci < cin_g; ++ci)
        for (i64 n0 = 0; n0 < s.N; n0 += nb) {
          const i64 nn = imin(nb, s.N - n0);
          for (i64 i = 0; i < nn; ++i)
            padded_phases(s, x + ((n0 + i) * s.Cin + g * cin_g + ci) * s.L, Lq, ph.p + i * S * Lq);
          for (i64 o1 = 0; o1 < no; o1 += OB) {
            const int ob = int(imin(OB, no - o1));
            const T* dz_rows[OB];
            for (int o = 0; o < OB; ++o)  // rows past the block repeat its last (not summed)
              dz_rows[o] = dz + (n0 * s.Cout + g * cout_g + o0 + o1 + imin(o, ob - 1)) * Lo;
            for (i64 k0 = 0; k0 < K; k0 += KB) {
              const int kb = int(imin(KB, K - k0));
              double* dst = acc.p + ((o1 * cin_g) + ci) * K + k0;
              if (ob == OB)
                wrows_tile_kb<V, OB, KB>(kb, dz_rows, s.Cout * Lo, ph.p, S * Lq, win_off.p + k0, nn,
                                         Lo, dst, cin_g * K, ob);
              else
                for (int o = 0; o < ob; ++o)
                  wrows_tile_kb<V, 1, KB>(kb, dz_rows + o, s.Cout * Lo, ph.p, S * Lq,
                                          win_off.p + k0, nn, Lo, dst + o * cin_g * K, cin_g * K,
                                          1);
            }
          }
        }
      for (i64 o = 0; o < no; ++o)
        for (i64 i = 0; i < cin_g * K; ++i)
          dw[(g * cout_g + o0 + o) * cin_g * K + i] = static_cast<T>(acc.p[o * cin_g * K + i]);
    }
  }
}

template <typename T>
void backward_impl(const Conv1dShape& s, bool batch_stats, const T* dy, const T* x, const T* w,
                   const T* z, const T* gamma, const T* beta, const T* mean, const T* invstd, T* dx,
                   T* dw, T* dbias, T* dgamma, T* dbeta, bool relu) {
  const bool need_dz = dx || dw || dbias;
  if (!(need_dz || dgamma || dbeta)) return;
  BnSums sums(s.Cout);
  bn_bwd_reduce(s, dy, z, gamma, beta, mean, invstd, relu, &sums, dgamma, dbeta);
  if (!need_dz) return;
  if (backward_units_fit<T>(s, dw != nullptr)) {
    backward_units(s, batch_stats, dy, x, w, z, gamma, beta, mean, invstd, relu, sums, dx, dw,
                   dbias);
    return;
  }
  T* dz = workspace<T>(s.N * s.Cout * s.Lout());
  bn_bwd_dz(s, batch_stats, dy, z, gamma, beta, mean, invstd, relu, sums, dz, dbias);
  if (dx) conv_bwd_data(s, dz, w, dx);
  if (dw) {
    if (dw_by_rows<T>(s))
      conv_bwd_weight_rows(s, dz, x, dw);
    else
      conv_bwd_weight(s, dz, x, dw);
  }
}

}  // namespace
}  // namespace FUSEDRES_ISA_NS
}  // namespace fusedres
