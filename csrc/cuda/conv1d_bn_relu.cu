// Fused conv1d + batchnorm + relu on the GPU, NCW contiguous layout, float32 or float16 data
// (per-channel batchnorm arrays in the data's dtype or in float32), float32 accumulation.
//
// Every conv (forward, backward-data, backward-weight) is one implicit GEMM on the same tile
// engine: a 64x64 output tile per 256-thread block, 4x4 outputs per thread, 16-deep shared
// memory slices of A and B gathered on the fly (padding, stride, dilation and groups live in
// the gather). Plain FMA, no tensor cores yet. Depthwise convs (groups == Cin, at most 8 output
// channels per group) have direct kernels of their own (conv_dw_*, below the GEMM ones).
//
// Statistics are deterministic (no atomics): the forward epilogue writes, per (column tile,
// channel), the tile's sum and its sum of squared deviations from the tile mean; a second
// kernel merges them in a fixed order in double (Chan's parallel variance), which does not
// suffer E[z^2] - E[z]^2 cancellation. Backward reductions and the split-K weight gradient
// follow the same pattern: float partials in a workspace, summed in a fixed order in double.
//
// Sizes are int32: the caller guarantees every tensor has at most 2^31 - 2^16 elements (room for
// a tile past the end), every dimension and hyper-parameter at most 2^31 - 1, and
// L + pad < 2^32. Input positions (l * stride - pad + tap * dil) may exceed int32 there; they
// are computed in unsigned arithmetic, modulo 2^32, where a true position p in [-2^31, 2^32)
// is in [0, L) exactly when its residue is below L (negative ones wrap to at least 2^31 > L).
#include "common.cuh"

namespace fusedres {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;  // 16x16 threads, 4x4 outputs each
static_assert(BM * BK == 4 * THREADS && BK * BN == 4 * THREADS, "4 loads per thread per slice");
static_assert(BM == 4 * 16 && BN == 4 * 16 && BK == 16, "index math below assumes these");

struct Shape {
  int N, Cin, L, Cout, K, Lout, stride, pad, dil, groups;
  __device__ int cin_g() const { return Cin / groups; }
  __device__ int cout_g() const { return Cout / groups; }
};

// C[rows, cols] tile at (row0, col0) = sum over k in [kbeg, kend) of A[row, k] * B[k, col].
// P supplies the gathers: row_state/col_state hoist the per-row/column index work out of the
// k loop; a()/b() are only called in range. Thread (tx, ty) owns rows ty + 16 i and columns
// tx + 16 j of the tile, so stores along columns are coalesced.
template <typename P>
__device__ __forceinline__ void gemm_tile(const P& p, int rows, int cols, int row0, int col0,
                                          int kbeg, int kend, float (&acc)[4][4]) {
  __shared__ float As[BK][BM + 1];  // transposed; +1 spreads the transposing stores over banks
  __shared__ float Bs[BK][BN];
  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  // A slice: element t + 256 q is (row t / 16 + 16 q, k t % 16).
  const int a_k = t & (BK - 1), a_r = t >> 4;
  typename P::RowState rs[4];
  bool row_ok[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int r = row0 + a_r + 16 * q;
    row_ok[q] = r < rows;
    rs[q] = p.row_state(row_ok[q] ? r : 0);
  }
  // B slice: element t + 256 q is (k t / 64 + 4 q, column t % 64).
  const int b_c = t & (BN - 1), b_k = t >> 6;
  const bool col_ok = col0 + b_c < cols;
  const typename P::ColState cs = p.col_state(col_ok ? col0 + b_c : 0);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = kbeg; k0 < kend; k0 += BK) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int k = k0 + a_k;
      As[a_k][a_r + 16 * q] = row_ok[q] && k < kend ? p.a(rs[q], k) : 0.f;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int kk = b_k + 4 * q, k = k0 + kk;
      Bs[kk][b_c] = col_ok && k < kend ? p.b(cs, k) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
}

// Forward conv of group g: rows are the group's output channels, columns m = n * Lout + l,
// k = c * K + tap over the group's input channels; A = weight (contiguous rows), B = data
// tap x[n, g * cin_g + c, l * stride + tap * dil - pad], zero outside [0, L).
template <typename T>
struct FwdProb {
  Shape s;
  const T* x;
  const T* w;
  int g, cin_g, cout_g, Kred;
  struct RowState {
    const T* wrow;
  };
  struct ColState {
    const T* xbase;
    unsigned pos0;
  };  // l * stride - pad, modulo 2^32
  __device__ RowState row_state(int r) const { return {w + (size_t)(g * cout_g + r) * Kred}; }
  __device__ float a(const RowState& rs, int k) const { return to_f(rs.wrow[k]); }
  __device__ ColState col_state(int m) const {
    const int n = m / s.Lout, l = m - n * s.Lout;
    return {x + ((size_t)n * s.Cin + (size_t)g * cin_g) * s.L,
            (unsigned)l * (unsigned)s.stride - (unsigned)s.pad};
  }
  __device__ float b(const ColState& cs, int k) const {
    const int c = k / s.K, tap = k - c * s.K;
    const unsigned pos = cs.pos0 + (unsigned)tap * (unsigned)s.dil;
    return pos < (unsigned)s.L ? to_f(cs.xbase[(size_t)c * s.L + pos]) : 0.f;
  }
};

template <typename T>
__device__ FwdProb<T> fwd_prob(const Shape& s, const T* x, const T* w, int g) {
  const int cin_g = s.cin_g();
  return FwdProb<T>{s, x, w, g, cin_g, s.cout_g(), cin_g * s.K};
}

// Backward data of group g: rows are the group's input channels c, columns m = n * L + i,
// k = co * K + tap over the group's output channels; A = w[g * cout_g + co, c, tap],
// B = dz[n, g * cout_g + co, l] where l * stride = i + pad - tap * dil (else zero). i + pad is
// below 2^32, tap * dil may not be: t is computed in 64 bits, divided in 32.
template <typename T>
struct BwdDataProb {
  Shape s;
  const float* dz;
  const T* w;
  int g, cin_g, cout_g;
  struct RowState {
    const T* wcol;
  };
  struct ColState {
    const float* dzbase;
    unsigned q0;
  };  // i + pad
  __device__ RowState row_state(int r) const {
    return {w + ((size_t)g * cout_g * cin_g + r) * s.K};
  }
  __device__ float a(const RowState& rs, int k) const {
    const int co = k / s.K, tap = k - co * s.K;
    return to_f(rs.wcol[(size_t)co * cin_g * s.K + tap]);
  }
  __device__ ColState col_state(int m) const {
    const int n = m / s.L, i = m - n * s.L;
    return {dz + ((size_t)n * s.Cout + (size_t)g * cout_g) * s.Lout, (unsigned)i + (unsigned)s.pad};
  }
  __device__ float b(const ColState& cs, int k) const {
    const int co = k / s.K, tap = k - co * s.K;
    const long long t = (long long)cs.q0 - (long long)tap * s.dil;
    if (t < 0) return 0.f;
    const unsigned ut = (unsigned)t, l = ut / (unsigned)s.stride;
    return l * (unsigned)s.stride == ut && l < (unsigned)s.Lout ? cs.dzbase[(size_t)co * s.Lout + l]
                                                                : 0.f;
  }
};

// Backward weight of group g: rows are the group's output channels co, columns r = c * K + tap,
// k = m = n * Lout + l over the batch; A = dz[n, g * cout_g + co, l],
// B = x[n, g * cin_g + c, l * stride + tap * dil - pad] (zero outside [0, L)).
template <typename T>
struct BwdWeightProb {
  Shape s;
  const float* dz;
  const T* x;
  int g, cin_g, cout_g;
  struct RowState {
    const float* dzrow;
  };
  struct ColState {
    const T* xbase;
    unsigned shift;
  };  // tap * dil - pad, modulo 2^32
  __device__ RowState row_state(int r) const { return {dz + (size_t)(g * cout_g + r) * s.Lout}; }
  __device__ float a(const RowState& rs, int m) const {
    const int n = m / s.Lout, l = m - n * s.Lout;
    return rs.dzrow[(size_t)n * s.Cout * s.Lout + l];
  }
  __device__ ColState col_state(int r) const {
    const int c = r / s.K, tap = r - c * s.K;
    return {x + (size_t)(g * cin_g + c) * s.L, (unsigned)tap * (unsigned)s.dil - (unsigned)s.pad};
  }
  __device__ float b(const ColState& cs, int m) const {
    const int n = m / s.Lout, l = m - n * s.Lout;
    const unsigned pos = (unsigned)l * (unsigned)s.stride + cs.shift;
    return pos < (unsigned)s.L ? to_f(cs.xbase[(size_t)n * s.Cin * s.L + pos]) : 0.f;
  }
};

// Offsets of this thread's 4 output columns m = col0 + tx + 16 j in an (N, C, W) tensor whose
// columns are m = n * W + w: offset n * C * W + w, plus c * W per channel.
__device__ __forceinline__ void column_offsets(int col0, int ncols, int W, int C, size_t (&off)[4],
                                               bool (&ok)[4]) {
  const int tx = threadIdx.x & 15;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int m = col0 + tx + 16 * j;
    ok[j] = m < ncols;
    const int n = m / W, w = m - n * W;
    off[j] = (size_t)n * C * W + w;
  }
}

// Sum over the 16 threads sharing ty (a half warp); every lane must call it.
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Statistics of one column tile of one channel, held by a half warp as the GEMM epilogue holds
// it (lane tx: columns tx + 16 j, ok[j] where the column exists, cnt of them in all): sum, and
// M2 about the tile mean sum / cnt, in every lane. Shared by the GEMM and the depthwise
// forward, so that the two give the same statistics bit for bit; __fmul_rn keeps the compiler
// from contracting d * d + m2 in one and not the other. Every lane must call it.
__device__ __forceinline__ void tile_stats(const float (&v)[4], const bool (&ok)[4], int cnt,
                                           float& sum, float& m2) {
  sum = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) sum += ok[j] ? v[j] : 0.f;
  sum = half_warp_sum(sum);
  const float mean_b = sum / cnt;
  m2 = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float d = v[j] - mean_b;
    m2 += ok[j] ? __fmul_rn(d, d) : 0.f;
  }
  m2 = half_warp_sum(m2);
}

template <typename T>
__device__ void conv_fwd_train(const Shape s, const T* __restrict__ x, const T* __restrict__ w,
                               const T* __restrict__ bias, T* __restrict__ z,
                               float* __restrict__ psum, float* __restrict__ pm2, int stats) {
  const int g = blockIdx.z, M = s.N * s.Lout;
  const FwdProb<T> p = fwd_prob(s, x, w, g);
  const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
  float acc[4][4];
  gemm_tile(p, p.cout_g, M, row0, col0, 0, p.Kred, acc);
  size_t off[4];
  bool cok[4];
  column_offsets(col0, M, s.Lout, s.Cout, off, cok);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4, cnt = min(BN, M - col0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = row0 + ty + 16 * i, co = g * p.cout_g + row;
    const bool rok = row < p.cout_g;
    const float bv = rok && bias ? to_f(bias[co]) : 0.f;
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const T zt = from_f<T>(acc[i][j] + bv);
      v[j] = to_f(zt);  // statistics of z as stored, as the CPU kernel computes them
      if (rok && cok[j]) z[off[j] + (size_t)co * s.Lout] = zt;
    }
    if (stats) {  // uniform: the whole warp takes the shuffles
      float sum, m2;
      tile_stats(v, cok, cnt, sum, m2);
      if (tx == 0 && rok) {
        psum[(size_t)blockIdx.x * s.Cout + co] = sum;
        pm2[(size_t)blockIdx.x * s.Cout + co] = m2;
      }
    }
  }
}

// Inference: the training path with running statistics in one pass, BatchNorm applied in the
// epilogue in its own order, y = relu((z - running_mean) * a + beta) on z = conv + bias as
// stored, a = gamma * invstd, invstd = 1 / sqrt(running_var + eps). Nothing is folded: folding
// the shift (or the scale into the weights) saves nothing here and would turn an infinite or
// NaN scale (gamma = inf, a NaN statistic) or an overflowing product into the wrong numbers.
template <typename T, typename P>
__device__ void conv_fwd_infer(const Shape s, const T* __restrict__ x, const T* __restrict__ w,
                               const T* __restrict__ bias, const P* __restrict__ gamma,
                               const P* __restrict__ beta, const P* __restrict__ rmean,
                               const P* __restrict__ rvar, float eps, int do_relu,
                               T* __restrict__ y) {
  const int g = blockIdx.z, M = s.N * s.Lout;
  const FwdProb<T> p = fwd_prob(s, x, w, g);
  const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
  float acc[4][4];
  gemm_tile(p, p.cout_g, M, row0, col0, 0, p.Kred, acc);
  size_t off[4];
  bool cok[4];
  column_offsets(col0, M, s.Lout, s.Cout, off, cok);
  const int ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = row0 + ty + 16 * i, co = g * p.cout_g + row;
    if (row >= p.cout_g) continue;
    const float invstd = 1.f / sqrtf(to_f(rvar[co]) + eps);
    const Affine af = bn_affine(to_f(gamma[co]), to_f(beta[co]), to_f(rmean[co]), invstd);
    const float bv = bias ? to_f(bias[co]) : 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float zv = to_f(from_f<T>(acc[i][j] + bv));  // z as the training path stores it
      if (cok[j]) y[off[j] + (size_t)co * s.Lout] = from_f<T>(act(af.pre(zv), do_relu));
    }
  }
}

template <typename T>
__device__ void conv_bwd_data(const Shape s, const float* __restrict__ dz, const T* __restrict__ w,
                              T* __restrict__ dx) {
  const int g = blockIdx.z, cin_g = s.cin_g(), cout_g = s.cout_g(), M = s.N * s.L;
  const BwdDataProb<T> p{s, dz, w, g, cin_g, cout_g};
  const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
  float acc[4][4];
  gemm_tile(p, cin_g, M, row0, col0, 0, cout_g * s.K, acc);
  size_t off[4];
  bool cok[4];
  column_offsets(col0, M, s.L, s.Cin, off, cok);
  const int ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = row0 + ty + 16 * i;
    if (row >= cin_g) continue;
    const size_t ch = (size_t)(g * cin_g + row) * s.L;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (cok[j]) dx[off[j] + ch] = from_f<T>(acc[i][j]);
  }
}

// Split-K over the batch: blockIdx.z = split * groups + g; split covers m in
// [split * kchunk, (split + 1) * kchunk). Writes ws[split][co * Kw + r] for every (co, r) of
// the tile, zeros included, so that sum_splits may read every split.
template <typename T>
__device__ void conv_bwd_weight(const Shape s, const T* __restrict__ x,
                                const float* __restrict__ dz, int kchunk, float* __restrict__ ws) {
  const int g = blockIdx.z % s.groups, split = blockIdx.z / s.groups;
  const int cin_g = s.cin_g(), cout_g = s.cout_g(), Kw = cin_g * s.K, M = s.N * s.Lout;
  const BwdWeightProb<T> p{s, dz, x, g, cin_g, cout_g};
  const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
  const int kbeg = min(M, split * kchunk), kend = kbeg + min(kchunk, M - kbeg);
  float acc[4][4];
  gemm_tile(p, cout_g, Kw, row0, col0, kbeg, kend, acc);
  float* out = ws + (size_t)split * s.Cout * Kw;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = row0 + ty + 16 * i;
    if (row >= cout_g) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = col0 + tx + 16 * j;
      if (r < Kw) out[(size_t)(g * cout_g + row) * Kw + r] = acc[i][j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Depthwise convs: groups == Cin (one input channel per group) and mult = Cout / groups output
// channels per input channel, at most 8 (the CPU engine's rule, csrc/cpu/engine/depthwise.h),
// where the GEMM tile would hold mult real rows of 64. Output channel co reads input channel
// co / mult. Direct convolutions, no shared memory: a thread per output (forward) or per input
// element (data gradient), a block per (channel, 8 taps, split of the batch) for the weight
// gradient. Grids are one-dimensional over the outputs (or channels), so groups is not bounded
// by a grid axis here. The forward and the data gradient accumulate exactly as the GEMM does
// (taps in order, fmaf, zero taps outside the input included), and the training forward's
// statistics use the GEMM epilogue's lane layout and tile_stats: z, y, the statistics and dx
// equal the GEMM path's bit for bit. The weight gradient differs from it in summation order.

constexpr int DW_TAPS = 8;  // weight-gradient taps per block, in registers

// z[n, co, l] before the bias: sum over taps of w[co, 0, tap] * x[n, co / mult, pos], pos =
// l * stride - pad + tap * dil modulo 2^32 (zero outside [0, L)), as FwdProb gathers it.
template <typename T>
__device__ __forceinline__ float dw_conv(const Shape& s, const T* __restrict__ x,
                                         const T* __restrict__ w, int mult, int n, int co, int l) {
  const T* xr = x + ((size_t)n * s.Cin + co / mult) * s.L;
  const T* wr = w + (size_t)co * s.K;
  const unsigned pos0 = (unsigned)l * (unsigned)s.stride - (unsigned)s.pad;
  float acc = 0.f;
  for (int tap = 0; tap < s.K; ++tap) {
    const unsigned pos = pos0 + (unsigned)tap * (unsigned)s.dil;
    acc = fmaf(to_f(wr[tap]), pos < (unsigned)s.L ? to_f(xr[pos]) : 0.f, acc);
  }
  return acc;
}

// Half warp h of the grid (16 lanes; blockDim.x / 16 per block) owns column tile h % ntiles of
// channel h / ntiles, its lane tx the columns tile * 64 + tx + 16 j as in conv_fwd_train; half
// warps past the last tile compute nothing but take the shuffles. Cout * ntiles is at most
// max(Cout, 2 * Cout * M / 64) < 2^31 - 2^16, and h below it plus 16.
template <typename T>
__device__ void conv_dw_fwd_train(const Shape s, const T* __restrict__ x, const T* __restrict__ w,
                                  const T* __restrict__ bias, T* __restrict__ z,
                                  float* __restrict__ psum, float* __restrict__ pm2, int stats) {
  const int M = s.N * s.Lout, ntiles = (M + BN - 1) / BN, mult = s.cout_g();
  const int h = blockIdx.x * (blockDim.x >> 4) + (threadIdx.x >> 4), tx = threadIdx.x & 15;
  const bool live = h < s.Cout * ntiles;
  const int tile = live ? h % ntiles : 0, co = live ? h / ntiles : 0, col0 = tile * BN;
  const float bv = live && bias ? to_f(bias[co]) : 0.f;
  float v[4];
  bool ok[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int m = col0 + tx + 16 * j;
    ok[j] = live && m < M;
    v[j] = 0.f;
    if (ok[j]) {
      const int n = m / s.Lout, l = m - n * s.Lout;
      const T zt = from_f<T>(dw_conv(s, x, w, mult, n, co, l) + bv);
      v[j] = to_f(zt);  // statistics of z as stored
      z[((size_t)n * s.Cout + co) * s.Lout + l] = zt;
    }
  }
  if (stats) {  // uniform: the whole warp takes the shuffles
    float sum, m2;
    tile_stats(v, ok, min(BN, M - col0), sum, m2);
    if (tx == 0 && live) {
      psum[(size_t)tile * s.Cout + co] = sum;
      pm2[(size_t)tile * s.Cout + co] = m2;
    }
  }
}

// A thread per output y[e], e = (n * Cout + co) * Lout + l < 2^31 - 2^16; the epilogue of
// conv_fwd_infer.
template <typename T, typename P>
__device__ void conv_dw_fwd_infer(const Shape s, const T* __restrict__ x, const T* __restrict__ w,
                                  const T* __restrict__ bias, const P* __restrict__ gamma,
                                  const P* __restrict__ beta, const P* __restrict__ rmean,
                                  const P* __restrict__ rvar, float eps, int do_relu,
                                  T* __restrict__ y) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= s.N * s.Cout * s.Lout) return;
  const int l = e % s.Lout, r = e / s.Lout, co = r % s.Cout, n = r / s.Cout;
  const float invstd = 1.f / sqrtf(to_f(rvar[co]) + eps);
  const Affine af = bn_affine(to_f(gamma[co]), to_f(beta[co]), to_f(rmean[co]), invstd);
  const float bv = bias ? to_f(bias[co]) : 0.f;
  const float zv = to_f(from_f<T>(dw_conv(s, x, w, s.cout_g(), n, co, l) + bv));
  y[e] = from_f<T>(act(af.pre(zv), do_relu));
}

// A thread per input element dx[e], e = (n * Cin + ci) * L + i < 2^31 - 2^16: the sum over the
// channel's mult outputs co = ci * mult + j and taps, in BwdDataProb's order and arithmetic, of
// w[co, 0, tap] * dz[n, co, l] where l * stride = i + pad - tap * dil (else zero).
template <typename T>
__device__ void conv_dw_bwd_data(const Shape s, const float* __restrict__ dz,
                                 const T* __restrict__ w, T* __restrict__ dx) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= s.N * s.Cin * s.L) return;
  const int i = e % s.L, r = e / s.L, ci = r % s.Cin, n = r / s.Cin, mult = s.cout_g();
  const float* dzr = dz + ((size_t)n * s.Cout + (size_t)ci * mult) * s.Lout;
  const T* wr = w + (size_t)ci * mult * s.K;
  const unsigned q0 = (unsigned)i + (unsigned)s.pad, stride = (unsigned)s.stride;
  float acc = 0.f;
  for (int j = 0; j < mult; ++j)
    for (int tap = 0; tap < s.K; ++tap) {
      const long long t = (long long)q0 - (long long)tap * s.dil;
      float d = 0.f;
      if (t >= 0) {
        const unsigned ut = (unsigned)t, l = stride == 1 ? ut : ut / stride;
        if (l * stride == ut && l < (unsigned)s.Lout) d = dzr[(size_t)j * s.Lout + l];
      }
      acc = fmaf(to_f(wr[(size_t)j * s.K + tap]), d, acc);
    }
  dx[e] = from_f<T>(acc);
}

// Block (co * ceil(K / DW_TAPS) + c, split) sums dz[n, co, l] * x[n, co / mult, l * stride +
// tap * dil - pad] for taps tap0 = c * DW_TAPS on (at most DW_TAPS of them) over the columns
// m = n * Lout + l in [split * chunk, (split + 1) * chunk): a strided share per thread, then
// block_sum (a fixed tree). Writes ws[split][co * K + tap] for each of its taps, zeros included,
// the layout conv_bwd_weight writes (Kw = K) and sum_splits reads.
template <typename T>
__device__ void conv_dw_bwd_weight(const Shape s, const T* __restrict__ x,
                                   const float* __restrict__ dz, int chunk,
                                   float* __restrict__ ws) {
  const int nchunks = (s.K + DW_TAPS - 1) / DW_TAPS, co = blockIdx.x / nchunks;
  const int tap0 = (blockIdx.x - co * nchunks) * DW_TAPS, ntaps = min(DW_TAPS, s.K - tap0);
  const int M = s.N * s.Lout, split = blockIdx.y;
  const int beg = min(M, split * chunk), end = beg + min(chunk, M - beg);
  const T* xc = x + (size_t)(co / s.cout_g()) * s.L;
  const float* dzc = dz + (size_t)co * s.Lout;
  const unsigned shift = (unsigned)tap0 * (unsigned)s.dil - (unsigned)s.pad;
  float acc[DW_TAPS];
#pragma unroll
  for (int k = 0; k < DW_TAPS; ++k) acc[k] = 0.f;
  for (int m = beg + threadIdx.x; m < end; m += blockDim.x) {
    const int n = m / s.Lout, l = m - n * s.Lout;
    const float d = dzc[(size_t)n * s.Cout * s.Lout + l];
    const T* xn = xc + (size_t)n * s.Cin * s.L;
    const unsigned pos0 = (unsigned)l * (unsigned)s.stride + shift;
#pragma unroll
    for (int k = 0; k < DW_TAPS; ++k)
      if (k < ntaps) {
        const unsigned pos = pos0 + (unsigned)k * (unsigned)s.dil;
        acc[k] = fmaf(d, pos < (unsigned)s.L ? to_f(xn[pos]) : 0.f, acc[k]);
      }
  }
  float* out = ws + (size_t)split * s.Cout * s.K + (size_t)co * s.K + tap0;
#pragma unroll
  for (int k = 0; k < DW_TAPS; ++k)
    if (k < ntaps) {  // uniform: every thread takes the block_sum
      const float t = block_sum(acc[k]);
      if (threadIdx.x == 0) out[k] = t;
    }
}

// out[i] = sum over splits s of ws[s * count + i], in split order, in double.
template <typename T>
__device__ void sum_splits(const float* __restrict__ ws, int nsplits, int count,
                           T* __restrict__ out) {
  const long long step = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count; i += step) {
    double acc = 0.0;
    for (int sp = 0; sp < nsplits; ++sp) acc += ws[(size_t)sp * count + i];
    out[i] = from_f<T>((float)acc);
  }
}

// One block per channel c: merges the column tiles' (sum, M2) into the batch mean and biased
// variance, writes mean/invstd and updates the running statistics. Without batch statistics
// it only derives mean/invstd from the running statistics.
template <typename P>
__device__ void bn_fwd_finalize(const float* __restrict__ psum, const float* __restrict__ pm2,
                                int ntiles, int M, int C, P* __restrict__ rmean,
                                P* __restrict__ rvar, P* __restrict__ mean, P* __restrict__ invstd,
                                double eps, double momentum, int batch_stats) {
  const int c = blockIdx.x;
  if (!batch_stats) {
    if (threadIdx.x == 0) {
      mean[c] = rmean[c];
      invstd[c] = from_f<P>((float)(1.0 / sqrt((double)to_f(rvar[c]) + eps)));
    }
    return;
  }
  double s = 0.0;
  for (int b = threadIdx.x; b < ntiles; b += blockDim.x) s += psum[(size_t)b * C + c];
  const double mu = block_sum(s) / M;
  double q = 0.0;
  for (int b = threadIdx.x; b < ntiles; b += blockDim.x) {
    const int nb = min(BN, M - b * BN);
    const double d = psum[(size_t)b * C + c] / nb - mu;
    q += pm2[(size_t)b * C + c] + nb * d * d;
  }
  const double var = block_sum(q) / M;
  if (threadIdx.x == 0) {
    mean[c] = from_f<P>((float)mu);
    invstd[c] = from_f<P>((float)(1.0 / sqrt(var + eps)));
    rmean[c] = from_f<P>((float)(momentum * to_f(rmean[c]) + (1.0 - momentum) * mu));
    rvar[c] = from_f<P>((float)(momentum * to_f(rvar[c]) + (1.0 - momentum) * var));
  }
}

// y = relu((z - mean) * a + beta) per channel; blocks stride over the N * C rows of length W.
template <typename T, typename P>
__device__ void bn_relu_apply(const T* __restrict__ z, const P* __restrict__ gamma,
                              const P* __restrict__ beta, const P* __restrict__ mean,
                              const P* __restrict__ invstd, int rows, int C, int W, int do_relu,
                              T* __restrict__ y) {
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const int c = (int)(row % C);
    const Affine af = bn_affine(to_f(gamma[c]), to_f(beta[c]), to_f(mean[c]), to_f(invstd[c]));
    const T* zr = z + (size_t)row * W;
    T* yr = y + (size_t)row * W;
    for (int l = threadIdx.x; l < W; l += blockDim.x)
      yr[l] = from_f<T>(act(af.pre(to_f(zr[l])), do_relu));
  }
}

// Per-channel constants of the backward, loaded once per block; scale = af.a = gamma * invstd.
struct BnChannel {
  Affine af;
  float invstd;
  __device__ float xhat(float z) const { return __fmul_rn(__fsub_rn(z, af.mean), invstd); }
};
template <typename P>
__device__ BnChannel bn_channel(const P* gamma, const P* beta, const P* mean, const P* invstd,
                                int c) {
  BnChannel r;
  r.invstd = to_f(invstd[c]);
  r.af = bn_affine(to_f(gamma[c]), to_f(beta[c]), to_f(mean[c]), r.invstd);
  return r;
}

// Block (c, s) owns elements e in [s * chunk, (s + 1) * chunk) of channel c's N * W values,
// e = n * W + w. Writes ws_g[s * C + c] = sum g, ws_gx[s * C + c] = sum g * xhat, where
// g = dy * relu'(pre) with the relu recomputed from z (every element counts: 0 * inf is NaN).
template <typename T, typename P>
__device__ void bn_bwd_reduce(const T* __restrict__ dy, const T* __restrict__ z,
                              const P* __restrict__ gamma, const P* __restrict__ beta,
                              const P* __restrict__ mean, const P* __restrict__ invstd, int N,
                              int C, int W, int chunk, int do_relu, float* __restrict__ ws_g,
                              float* __restrict__ ws_gx) {
  const int c = blockIdx.x, sp = blockIdx.y, total = N * W;
  const BnChannel ch = bn_channel(gamma, beta, mean, invstd, c);
  const int beg = min(total, sp * chunk), end = beg + min(chunk, total - beg);
  float sg = 0.f, sgx = 0.f;
  for (int e = beg + threadIdx.x; e < end; e += blockDim.x) {
    const int n = e / W;
    const size_t off = ((size_t)n * C + c) * W + (e - n * W);
    const float zv = to_f(z[off]);
    const float gv = act_grad(to_f(dy[off]), ch.af.pre(zv), do_relu);
    sg += gv;
    sgx += gv * ch.xhat(zv);
  }
  sg = block_sum(sg);
  sgx = block_sum(sgx);
  if (threadIdx.x == 0) {
    ws_g[(size_t)sp * C + c] = sg;
    ws_gx[(size_t)sp * C + c] = sgx;
  }
}

// One thread per channel: dgamma = sum g * xhat, dbeta = sum g (null: not wanted), and the
// dz constants of the batch statistics, coef[c] = mean(g), coef[C + c] = mean(g * xhat).
template <typename P>
__device__ void bn_bwd_finalize(const float* __restrict__ ws_g, const float* __restrict__ ws_gx,
                                int nsplits, int C, int M, P* __restrict__ dgamma,
                                P* __restrict__ dbeta, float* __restrict__ coef) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sg = 0.0, sgx = 0.0;
  for (int sp = 0; sp < nsplits; ++sp) {
    sg += ws_g[(size_t)sp * C + c];
    sgx += ws_gx[(size_t)sp * C + c];
  }
  if (dgamma) dgamma[c] = from_f<P>((float)sgx);
  if (dbeta) dbeta[c] = from_f<P>((float)sg);
  coef[c] = (float)(sg / M);
  coef[C + c] = (float)(sgx / M);
}

// dz = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)) with batch statistics, and
// gamma * invstd * g without: the batch terms are left out rather than multiplied by 0, which
// an infinite xhat would turn into NaN (the CPU dz_of). Stored as float32 for the two backward
// convs; same block partition as bn_bwd_reduce. ws_dz (nullable) gets per-block sums of dz for
// the bias gradient.
template <typename T, typename P>
__device__ void bn_bwd_dz(const T* __restrict__ dy, const T* __restrict__ z,
                          const P* __restrict__ gamma, const P* __restrict__ beta,
                          const P* __restrict__ mean, const P* __restrict__ invstd,
                          const float* __restrict__ coef, int N, int C, int W, int chunk,
                          int do_relu, int batch_stats, float* __restrict__ dz,
                          float* __restrict__ ws_dz) {
  const int c = blockIdx.x, sp = blockIdx.y, total = N * W;
  const BnChannel ch = bn_channel(gamma, beta, mean, invstd, c);
  const float mg = coef[c], mgx = coef[C + c];
  const int beg = min(total, sp * chunk), end = beg + min(chunk, total - beg);
  float sdz = 0.f;
  for (int e = beg + threadIdx.x; e < end; e += blockDim.x) {
    const int n = e / W;
    const size_t off = ((size_t)n * C + c) * W + (e - n * W);
    const float zv = to_f(z[off]);
    const float gv = act_grad(to_f(dy[off]), ch.af.pre(zv), do_relu);
    const float d = batch_stats ? ch.af.a * (gv - mg - ch.xhat(zv) * mgx) : ch.af.a * gv;
    dz[off] = d;
    sdz += d;
  }
  if (ws_dz) {  // uniform
    sdz = block_sum(sdz);
    if (threadIdx.x == 0) ws_dz[(size_t)sp * C + c] = sdz;
  }
}

}  // namespace
}  // namespace fusedres

// extern "C" entry points. Suffix: f32 (float32 everywhere), f16 (float16 everywhere),
// f16_p32 (float16 data with float32 per-channel batchnorm arrays, as Gluon keeps them).
#define FUSEDRES_SHAPE_PARAMS \
  int N, int Cin, int L, int Cout, int K, int Lout, int stride, int pad, int dil, int groups
#define FUSEDRES_SHAPE \
  fusedres::Shape { N, Cin, L, Cout, K, Lout, stride, pad, dil, groups }

#define FUSEDRES_DATA_KERNELS(SUF, T)                                                            \
  extern "C" __global__ void __launch_bounds__(fusedres::THREADS)                                \
      conv1d_fwd_train_##SUF(FUSEDRES_SHAPE_PARAMS, const T* x, const T* w, const T* bias, T* z, \
                             float* psum, float* pm2, int stats) {                               \
    fusedres::conv_fwd_train<T>(FUSEDRES_SHAPE, x, w, bias, z, psum, pm2, stats);                \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(fusedres::THREADS)                                \
      conv1d_bwd_data_##SUF(FUSEDRES_SHAPE_PARAMS, const float* dz, const T* w, T* dx) {         \
    fusedres::conv_bwd_data<T>(FUSEDRES_SHAPE, dz, w, dx);                                       \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(fusedres::THREADS) conv1d_bwd_weight_##SUF(       \
      FUSEDRES_SHAPE_PARAMS, const T* x, const float* dz, int kchunk, float* ws) {               \
    fusedres::conv_bwd_weight<T>(FUSEDRES_SHAPE, x, dz, kchunk, ws);                             \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(fusedres::THREADS)                                \
      conv1d_dw_fwd_train_##SUF(FUSEDRES_SHAPE_PARAMS, const T* x, const T* w, const T* bias,    \
                                T* z, float* psum, float* pm2, int stats) {                      \
    fusedres::conv_dw_fwd_train<T>(FUSEDRES_SHAPE, x, w, bias, z, psum, pm2, stats);             \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(fusedres::THREADS)                                \
      conv1d_dw_bwd_data_##SUF(FUSEDRES_SHAPE_PARAMS, const float* dz, const T* w, T* dx) {      \
    fusedres::conv_dw_bwd_data<T>(FUSEDRES_SHAPE, dz, w, dx);                                    \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(fusedres::THREADS) conv1d_dw_bwd_weight_##SUF(    \
      FUSEDRES_SHAPE_PARAMS, const T* x, const float* dz, int chunk, float* ws) {                \
    fusedres::conv_dw_bwd_weight<T>(FUSEDRES_SHAPE, x, dz, chunk, ws);                           \
  }                                                                                              \
  extern "C" __global__ void sum_splits_##SUF(const float* ws, int nsplits, int count, T* out) { \
    fusedres::sum_splits<T>(ws, nsplits, count, out);                                            \
  }

#define FUSEDRES_PARAM_KERNELS(SUF, P)                                                             \
  extern "C" __global__ void bn_fwd_finalize_##SUF(                                                \
      const float* psum, const float* pm2, int ntiles, int M, int C, P* rmean, P* rvar, P* mean,   \
      P* invstd, double eps, double momentum, int batch_stats) {                                   \
    fusedres::bn_fwd_finalize<P>(psum, pm2, ntiles, M, C, rmean, rvar, mean, invstd, eps,          \
                                 momentum, batch_stats);                                           \
  }                                                                                                \
  extern "C" __global__ void bn_bwd_finalize_##SUF(const float* ws_g, const float* ws_gx,          \
                                                   int nsplits, int C, int M, P* dgamma, P* dbeta, \
                                                   float* coef) {                                  \
    fusedres::bn_bwd_finalize<P>(ws_g, ws_gx, nsplits, C, M, dgamma, dbeta, coef);                 \
  }

#define FUSEDRES_MIXED_KERNELS(SUF, T, P)                                                          \
  extern "C" __global__ void __launch_bounds__(fusedres::THREADS) conv1d_fwd_infer_##SUF(          \
      FUSEDRES_SHAPE_PARAMS, const T* x, const T* w, const T* bias, const P* gamma, const P* beta, \
      const P* rmean, const P* rvar, float eps, int do_relu, T* y) {                               \
    fusedres::conv_fwd_infer<T, P>(FUSEDRES_SHAPE, x, w, bias, gamma, beta, rmean, rvar, eps,      \
                                   do_relu, y);                                                    \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(fusedres::THREADS) conv1d_dw_fwd_infer_##SUF(       \
      FUSEDRES_SHAPE_PARAMS, const T* x, const T* w, const T* bias, const P* gamma, const P* beta, \
      const P* rmean, const P* rvar, float eps, int do_relu, T* y) {                               \
    fusedres::conv_dw_fwd_infer<T, P>(FUSEDRES_SHAPE, x, w, bias, gamma, beta, rmean, rvar, eps,   \
                                      do_relu, y);                                                 \
  }                                                                                                \
  extern "C" __global__ void bn_relu_apply_##SUF(const T* z, const P* gamma, const P* beta,        \
                                                 const P* mean, const P* invstd, int rows, int C,  \
                                                 int W, int do_relu, T* y) {                       \
    fusedres::bn_relu_apply<T, P>(z, gamma, beta, mean, invstd, rows, C, W, do_relu, y);           \
  }                                                                                                \
  extern "C" __global__ void bn_bwd_reduce_##SUF(                                                  \
      const T* dy, const T* z, const P* gamma, const P* beta, const P* mean, const P* invstd,      \
      int N, int C, int W, int chunk, int do_relu, float* ws_g, float* ws_gx) {                    \
    fusedres::bn_bwd_reduce<T, P>(dy, z, gamma, beta, mean, invstd, N, C, W, chunk, do_relu, ws_g, \
                                  ws_gx);                                                          \
  }                                                                                                \
  extern "C" __global__ void bn_bwd_dz_##SUF(                                                      \
      const T* dy, const T* z, const P* gamma, const P* beta, const P* mean, const P* invstd,      \
      const float* coef, int N, int C, int W, int chunk, int do_relu, int batch_stats, float* dz,  \
      float* ws_dz) {                                                                              \
    fusedres::bn_bwd_dz<T, P>(dy, z, gamma, beta, mean, invstd, coef, N, C, W, chunk, do_relu,     \
                              batch_stats, dz, ws_dz);                                             \
  }

FUSEDRES_DATA_KERNELS(f32, float)
FUSEDRES_DATA_KERNELS(f16, __half)
FUSEDRES_PARAM_KERNELS(f32, float)
FUSEDRES_PARAM_KERNELS(f16, __half)
FUSEDRES_MIXED_KERNELS(f32, float, float)
FUSEDRES_MIXED_KERNELS(f16, __half, __half)
FUSEDRES_MIXED_KERNELS(f16_p32, __half, float)
