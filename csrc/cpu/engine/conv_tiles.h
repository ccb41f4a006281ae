// The convolution itself: register tiles over taps (conv_mk, conv_tile, conv_unit), weight
// packing, output chunking, stride phases (interleave, deinterleave) and conv_forward_all.
// Part of the conv engine (conv_engine.h): compiled once per instruction set, inside that
// translation unit's namespace, after isa_traits.h; not a header of its own.
#pragma once
#include "common.h"

namespace fusedres {
namespace FUSEDRES_ISA_NS {
namespace {

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
  // Input of the next unit, fetched into L2 while this one computes (rows pf + r * pf_cs,
  // r < pf_rows, elements [0, pf_len)): without it the first pass over a unit's input waits
  // on memory whenever another layer has evicted it (always, inside a network).
  const T* pf = nullptr;
  i64 pf_rows = 0, pf_cs = 0, pf_len = 0;
};

// Prefetches rows [r0, r1) of a unit's prefetch descriptor into L2.
template <class V>
FR_INLINE void prefetch_rows(const ConvUnit<V>& u, i64 r0, i64 r1) {
  constexpr i64 LINE = 64 / i64(sizeof(typename V::T));
  for (i64 r = r0; r < r1; ++r) {
    const typename V::T* p = u.pf + r * u.pf_cs;
    for (i64 e = 0; e < u.pf_len; e += LINE) __builtin_prefetch(p + e, 0, 2);
  }
}

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
  // Tiles of nv vectors at j with int_lo <= j and j + nv * W <= int_end read no padding: plain
  // loads (masked ones cost a third more: (16, 512, 32) -> 512 k3 on AVX2, all tiles masked).
  i64 int_lo = ja, int_end = jb + TW;
  for (int t = 0; t < u.ntaps; ++t) {
    int_lo = imax(int_lo, -u.taps[t].off);
    int_end = imin(int_end, u.taps[t].len - u.taps[t].off);
  }
  const i64 ncb = cdiv(u.rows, MR), pf_per_cb = cdiv(u.pf_rows, ncb);
  for (i64 cb = 0; cb < ncb; ++cb) {
    if (u.pf) prefetch_rows(u, cb * pf_per_cb, imin(u.pf_rows, (cb + 1) * pf_per_cb));
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
      const int nv = rem >= TW ? NR : int(cdiv(rem, W));
      const bool masked = !(j >= int_lo && j + nv * W <= int_end);
      if (nv == NR)
        conv_tile<V, MR, NR, EPI>(u, wblk, r0, nr, bv, j, jb, masked, sv, qv, shift, first);
      else if (NR >= 4 && nv == 3)
        conv_tile<V, MR, (NR >= 4 ? 3 : 1), EPI>(u, wblk, r0, nr, bv, j, jb, masked, sv, qv, shift,
                                                 first);
      else if (NR >= 3 && nv == 2)
        conv_tile<V, MR, (NR >= 3 ? 2 : 1), EPI>(u, wblk, r0, nr, bv, j, jb, masked, sv, qv, shift,
                                                 first);
      else if (nv == 1)
        conv_tile<V, MR, 1, EPI>(u, wblk, r0, nr, bv, j, jb, masked, sv, qv, shift, first);
      else
        conv_tile<V, MR, NR, EPI>(u, wblk, r0, nr, bv, j, jb, true, sv, qv, shift, first);
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

// Packs the weights W[g][o][i][k] = w[g*sg + o*so + i*si + k] (o < rows output rows, i < nci
// inputs, k over the taps tapk) into [g][cb][tap][i][MR], times scale[g*rows + o] (in double,
// then rounded) when scale is given. The forward reads w as [o][i][k] (so = nci*K, si = K); the
// data gradient's transposed weights are w as [i][o][k] (so = K, si = rows*K). In parallel over
// pieces of a block of MR rows o by IB inputs i, the blocks' pieces of IB inputs one after
// another: a piece reads IB inputs' runs of MR rows (IB read streams through w in either
// layout) and writes ntaps runs of IB * MR values. (A block of rows o over every input at a time
// read the data gradient's weights a run per input, rows*K apart, and took 11% of the backward at
// (16, 512, 32) -> 512 k3, AVX-512, 2 threads; one thread in the order of a row o at a time took a
// third of the forward at (1, 256, 256) -> 256 k3.)
template <class V>
void pack_weights(typename V::T* wp, i64 G, i64 rows, i64 nci, int ntaps, const int* tapk,
                  const typename V::T* w, i64 sg, i64 so, i64 si, const double* scale = nullptr) {
  using T = typename V::T;
  constexpr int MR = V::MR;
  constexpr i64 IB = 16;
  const i64 ncb = cdiv(rows, MR), blk = i64(ntaps) * nci * MR, nib = cdiv(nci, IB);
#pragma omp parallel for schedule(static) if (G * ncb * blk >= (i64(1) << 16))
  for (i64 item = 0; item < G * ncb * nib; ++item) {
    const i64 gcb = item % (G * ncb), g = gcb / ncb, o0 = (gcb % ncb) * MR;
    const i64 i0 = (item / (G * ncb)) * IB, i1 = imin(nci, i0 + IB);
    const int nr = int(imin(MR, rows - o0));
    const T* src = w + g * sg + o0 * so + i0 * si;
    const double* sc = scale ? scale + g * rows + o0 : nullptr;
    T* b = wp + gcb * blk;
    for (i64 i = i0; i < i1; ++i, src += si)
      for (int t = 0; t < ntaps; ++t) {
        T* d = b + (i64(t) * nci + i) * MR;
        const T* sk = src + tapk[t];
        if (sc)
          for (int r = 0; r < nr; ++r) d[r] = static_cast<T>(sk[r * so] * sc[r]);
        else
          for (int r = 0; r < nr; ++r) d[r] = sk[r * so];
        for (int r = nr; r < MR; ++r) d[r] = T(0);
      }
  }
}

// The first of n units that thread t of nt takes in a `schedule(static)` loop (libgomp's split:
// n / nt each, one more for the first n % nt threads).
FR_INLINE i64 static_first(i64 n, i64 nt, i64 t) { return t * (n / nt) + imin(t, n % nt); }

// Output-position chunking shared by the convolution passes: a unit is (n, chunk of CH
// positions), the threads take runs of units as schedule(static) splits them. CH: as many
// positions as keep a unit's input (bytes_per_pos each) within 192 KiB, a multiple of the
// tile (NR vectors). With few units for the threads (small batches), the chunks are made
// smaller, a multiple of the vector width, for the split whose busiest thread has the least work,
// counted in vectors of positions plus one per unit (its staging and pass over the weights);
// the fewest units among equals. A whole tile per chunk left the threads uneven: at (1, 256,
// 256) -> 256 k3, chunks of 48 gave one thread 144 positions and the other 112 (inference
// 0.515 ms); chunks of 128 give each 128 (0.459 ms; A/B in one process, 2 threads, AVX-512).
struct Chunks {
  i64 CH, nch;
};
template <class V>
Chunks make_chunks(i64 N, i64 Lout, i64 bytes_per_pos) {
  constexpr i64 vec = V::W, tile = V::NR * V::W;
  i64 CH = imax(tile, (192 * 1024 / imax(bytes_per_pos, 1)) / tile * tile);
  CH = imin(CH, rup(Lout, tile));
  const i64 nt = omp_get_max_threads();
  if (nt <= 1 || N * cdiv(Lout, CH) >= 8 * nt) return Chunks{CH, cdiv(Lout, CH)};
  const i64 nv = cdiv(Lout, vec);  // vectors of positions per row
  Chunks best{CH, cdiv(Lout, CH)};
  i64 best_cost = -1;
  // at most 64 candidates (each costs a pass over the threads)
  const i64 w0 = cdiv(Lout, CH), w1 = imin(nv, imax(w0, 8 * nt / N)),
            step = imax(1, (w1 - w0) / 64);
  for (i64 want = w0; want <= w1; want += step) {
    const i64 ch = rup(cdiv(Lout, want), vec), nch = cdiv(Lout, ch), n = N * nch;
    if (best_cost >= 0 && nch == best.nch) continue;
    const i64 full = ch / vec, last = nv - (nch - 1) * full;  // vectors of a chunk, of a row's last
    i64 cost = 0;
    for (i64 t = 0; t < nt; ++t) {
      const i64 a = static_first(n, nt, t), b = static_first(n, nt, t + 1);
      const i64 lasts = b / nch - a / nch;  // row ends among units [a, b)
      cost = imax(cost, (b - a) * (full + 1) - lasts * (full - last));
    }
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = Chunks{ch, nch};
    }
  }
  return best;
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

// The taps of a row conv reading input row xr (length L): the row shifted by k*dilation - pad
// (stride 1), or the phase rows ph[r][q] = xr[q*S + r] written here (stride S > 1).
template <typename T>
void row_taps(const Conv1dShape& s, const T* xr, T* ph, Tap<T>* taps) {
  const i64 S = s.stride, Lq = cdiv(s.L, S);
  if (S > 1) deinterleave(xr, 1, s.L, S, 0, Lq, ph, Lq);
  for (i64 k = 0; k < s.K; ++k) {
    const i64 off = k * s.dilation - s.pad;
    if (S == 1) {
      taps[k] = Tap<T>{xr, off, s.L};
    } else {
      const i64 r = fmod_pos(off, S);
      taps[k] = Tap<T>{ph + r * Lq, fdiv(off, S), r < s.L ? cdiv(s.L - r, S) : 0};
    }
  }
}

// Copies what taps[0, ntaps) read for output positions [ja, jb) (tiles of tw positions, the
// last read up to tw - 1 past jb) from rows [0, nrows) of their input (row stride cs) into buf
// (row stride ld >= jb - ja + tw + the taps' offset span), zeros where they read padding, and
// points the taps there: every tile then loads without masks. The taps must share one base and
// length, as those of a stride-1 conv and of one phase of the data gradient do. Returns the new
// row stride.
template <typename T>
i64 stage_taps(Tap<T>* taps, int ntaps, i64 nrows, i64 cs, i64 ja, i64 jb, i64 tw, T* buf, i64 ld) {
  i64 omin = taps[0].off, omax = taps[0].off;
  for (int t = 1; t < ntaps; ++t) {
    omin = imin(omin, taps[t].off);
    omax = imax(omax, taps[t].off);
  }
  // positions [q0, q0 + nq) are read, [q0 + lo, q0 + hi) of them inside the row
  const i64 q0 = ja + omin, nq = jb - ja + tw + omax - omin, len = taps[0].len;
  const i64 lo = iclamp(-q0, 0, nq), hi = iclamp(len - q0, lo, nq);
  const T* src = taps[0].base + q0 + lo;
  for (i64 r = 0; r < nrows; ++r) {
    T* d = buf + r * ld;
    std::fill(d, d + lo, T(0));
    if (hi > lo) std::memcpy(d + lo, src + r * cs, size_t(hi - lo) * sizeof(T));
    std::fill(d + hi, d + nq, T(0));
  }
  // element (ci, j) of tap t, position j + off, is buf[ci * ld + j + off - q0]
  for (int t = 0; t < ntaps; ++t) taps[t] = Tap<T>{buf - ja, taps[t].off - omin, ja + nq};
  return ld;
}

// sum_j a[j] * b[j] for j in [0, n) (float vectors flushed to double every 1024 positions).
template <class V>
FR_INLINE double row_dot(const typename V::T* a, const typename V::T* b, i64 n) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  double total = 0;
  for (i64 i0 = 0; i0 < n; i0 += 1024) {
    const i64 i1 = imin(n, i0 + 1024);
    reg s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
    i64 i = i0;
    for (; i + 4 * W <= i1; i += 4 * W) {
      s0 = V::fma(V::load(a + i), V::load(b + i), s0);
      s1 = V::fma(V::load(a + i + W), V::load(b + i + W), s1);
      s2 = V::fma(V::load(a + i + 2 * W), V::load(b + i + 2 * W), s2);
      s3 = V::fma(V::load(a + i + 3 * W), V::load(b + i + 3 * W), s3);
    }
    for (; i + W <= i1; i += W) s0 = V::fma(V::load(a + i), V::load(b + i), s0);
    if (i < i1) {
      const auto m = V::range(0, int(i1 - i));
      s1 = V::fma(V::loadm(a + i, m), V::loadm(b + i, m), s1);
    }
    total += double(V::hsum(V::add(V::add(s0, s1), V::add(s2, s3))));
  }
  return total;
}

// dst[k] += sum_l dz[l] * tap_k(l) over l in [0, Lo) where tap k is inside its row: one input
// row's share of a weight gradient.
template <class V>
FR_INLINE void tap_dots(const typename V::T* dz, i64 Lo, const Tap<typename V::T>* taps, i64 K,
                        double* dst) {
  for (i64 k = 0; k < K; ++k) {
    const Tap<typename V::T>& t = taps[k];
    const i64 la = iclamp(-t.off, 0, Lo), lb = iclamp(t.len - t.off, 0, Lo);
    if (la < lb) dst[k] += row_dot<V>(dz + la, t.base + la + t.off, lb - la);
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
  const i64 Wq = alias_free_ld<T>(ch.CH + dmax - dmin + 1);
  // stride 1: each unit's input is staged (stage_taps): tiles then load without masks, and rows
  // that alias in L1 do not. Forward, 2 threads, AVX2, A/B in one process (Zen 2): (16, 512, 32)
  // -> 512 k3 6.5 -> 5.2 ms (every tile was masked), (16, 256, 64) -> 256 k3 3.0 -> 2.3 ms,
  // (16, 256, 1024) -> 4 k3 3.3 -> 2.3 ms (aliasing); (32, 64, 1024) -> 64 k3 (aliasing, Zen 3)
  // 7.7 -> 5.3 ms; the rest of bench/kernel_timing.py's stride-1 shapes within noise.
  constexpr i64 TW = V::NR * V::W;
  const i64 ldx = alias_free_ld<T>(ch.CH + TW + (K - 1) * s.dilation);
  // Wide layers on short rows: when a group's packed weights outgrow half of L2, every unit
  // would stream them from L3 again. If a thread's share of the input fits in half of L2
  // instead, (stride 1) each thread goes over its units a block of rb output rows at a time,
  // reading each block's weights once and the input from L2, staged once per group for all of
  // its units (staging each unit again for every block cost 5-14%: inference A/B in one
  // process, 2 threads, Zen 2, (1, 256, 256) -> 256 k3 0.694 -> 0.659 ms, (1, 512, 128) -> 512
  // 1.93 -> 1.67, (4, 256, 64) -> 256 0.687 -> 0.649). Same tiles and per-unit statistics
  // either way: the results are the same numbers.
  const i64 wrow = K * cin_g * i64(sizeof(T));  // packed bytes per output row
  const i64 share =
      cdiv(nunits, omp_get_max_threads()) * cin_g * (ch.CH + (K - 1) * s.dilation) * i64(sizeof(T));
  const bool row_blocked =
      S == 1 && rup(cout_g, V::MR) * wrow > (i64(512) << 10) && share <= (i64(512) << 10);
  const i64 rb = imax(V::MR, ((i64(256) << 10) / wrow) / V::MR * V::MR);
#pragma omp parallel if (worth_threads(s.N * s.Cout * Lo * cin_g * K))
  {
    Buf<T> ph(S > 1 ? s.Cin * S * Wq : 0);
    Buf<T> xs(S == 1 && !row_blocked ? cin_g * ldx : 0);
    Tap<T> taps[64];
    Buf<Tap<T>> taps_big(K > 64 ? K : 0);
    Tap<T>* tp = K > 64 ? taps_big.p : taps;
    if (row_blocked) {
      // Each thread takes its share of the units a block of output rows at a time, their
      // inputs staged once per group (row_blocked's condition bounds the windows read to half
      // of L2; the staged rows, ldx apart, hold up to a tile and alias padding more).
      const int nt = omp_get_num_threads(), t = omp_get_thread_num();
      const i64 u0 = static_first(nunits, nt, t), u1 = static_first(nunits, nt, t + 1);
      const i64 nu = u1 - u0;
      Buf<T> xall(nu * cin_g * ldx);  // [unit][cin_g][ldx]
      Buf<Tap<T>> tall(nu * K);
      Buf<i64> csall(nu);
      for (i64 g = 0; g < G; ++g) {
        for (i64 u = u0; u < u1; ++u) {
          const i64 n = u / ch.nch, ja = (u % ch.nch) * ch.CH, jb = imin(Lo, ja + ch.CH);
          Tap<T>* ut = tall.p + (u - u0) * K;
          for (i64 k = 0; k < K; ++k)
            ut[k] = Tap<T>{x + (n * s.Cin + g * cin_g) * s.L, k * s.dilation - s.pad, s.L};
          csall.p[u - u0] =
              stage_taps(ut, int(K), cin_g, s.L, ja, jb, TW, xall.p + (u - u0) * cin_g * ldx, ldx);
        }
        for (i64 r0 = 0; r0 < cout_g; r0 += rb)
          for (i64 u = u0; u < u1; ++u) {
            const i64 n = u / ch.nch, ja = (u % ch.nch) * ch.CH, jb = imin(Lo, ja + ch.CH);
            const i64 co0 = g * cout_g + r0;
            ConvUnit<V> cu{tall.p + (u - u0) * K,
                           int(K),
                           csall.p[u - u0],
                           cin_g,
                           wp + g * wgroup + r0 * K * cin_g,
                           imin(rb, cout_g - r0),
                           bias ? bias + co0 : nullptr,
                           out + (n * s.Cout + co0) * Lo,
                           Lo,
                           stats ? stats + (u * s.Cout + co0) * 3 : nullptr};
            run_conv_unit<V, EPI>(cu, ja, jb);
          }
      }
    } else {
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
          const i64 cs = S == 1 ? stage_taps(tp, int(K), cin_g, s.L, ja, jb, TW, xs.p, ldx) : Wq;
          ConvUnit<V> cu{tp,
                         int(K),
                         cs,
                         cin_g,
                         wp + g * wgroup,
                         cout_g,
                         bias ? bias + g * cout_g : nullptr,
                         out + (n * s.Cout + g * cout_g) * Lo,
                         Lo,
                         stats ? stats + (u * s.Cout + g * cout_g) * 3 : nullptr};
          if (u + 1 < nunits) {
            // the next unit's input window of this group's channels
            const i64 n1 = (u + 1) / ch.nch, ja1 = ((u + 1) % ch.nch) * ch.CH;
            const i64 jb1 = imin(Lo, ja1 + ch.CH);
            const i64 p0 = iclamp(ja1 * S - s.pad, 0, s.L);
            const i64 p1 = iclamp((jb1 - 1) * S + (K - 1) * s.dilation - s.pad + 1, 0, s.L);
            cu.pf = x + (n1 * s.Cin + g * cin_g) * s.L + p0;
            cu.pf_rows = cin_g;
            cu.pf_cs = s.L;
            cu.pf_len = p1 - p0;
          }
          run_conv_unit<V, EPI>(cu, ja, jb);
        }
      }
    }
  }
}

}  // namespace
}  // namespace FUSEDRES_ISA_NS
}  // namespace fusedres
