// The forward passes: forward_train_impl (conv with batch statistics in the epilogue, then
// normalize_relu) and forward_infer_impl (batchnorm folded into the weights when finite).
// Part of the conv engine (conv_engine.h): compiled once per instruction set, inside that
// translation unit's namespace, after isa_traits.h; not a header of its own.
#pragma once
#include "conv_tiles.h"

namespace fusedres {
namespace FUSEDRES_ISA_NS {
namespace {

// The forward's packed weights (times scale[co], in double, when given: the inference fold).
template <class V>
void pack_forward(const Conv1dShape& s, const typename V::T* w, typename V::T* wp,
                  const double* scale = nullptr) {
  const i64 G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G, K = s.K;
  Buf<int> tk(K);
  for (i64 k = 0; k < K; ++k) tk.p[k] = int(k);
  pack_weights<V>(wp, G, cout_g, cin_g, int(K), tk.p, w, cout_g * cin_g * K, cin_g * K, K, scale);
}

template <class V>
i64 packed_size_forward(const Conv1dShape& s) {
  const i64 G = s.groups, cin_g = s.Cin / G, cout_g = s.Cout / G;
  return G * cdiv(cout_g, V::MR) * V::MR * s.K * cin_g;
}

// One row of y = relu(bn(z)) (bn(z) without relu). y may be z.
template <class V>
FR_INLINE void normalize_row(const BnChannel<V>& ch, const typename V::T* zr, typename V::T* yr,
                             i64 Lo) {
  constexpr int W = V::W;
  i64 l = 0;
  for (; l + W <= Lo; l += W) V::store(yr + l, ch.out(V::load(zr + l)));
  if (l < Lo) {
    const auto m = V::range(0, int(Lo - l));
    V::storem(yr + l, ch.out(V::loadm(zr + l, m)), m);
  }
}

// y = relu(bn(z)) per channel (bn(z) without relu), parallel over rows. y may be z.
template <class V>
void normalize_relu(const Conv1dShape& s, const typename V::T* z, const typename V::T* gamma,
                    const typename V::T* beta, const typename V::T* mean,
                    const typename V::T* invstd, typename V::T* y, bool relu) {
  const i64 Lo = s.Lout(), rows = s.N * s.Cout;
#pragma omp parallel for schedule(static) if (worth_threads(2 * rows * Lo))
  for (i64 row = 0; row < rows; ++row) {
    const i64 co = row % s.Cout;
    const BnChannel<V> ch(gamma[co], beta[co], mean[co], invstd[co], relu);
    normalize_row<V>(ch, z + row * Lo, y + row * Lo, Lo);
  }
}

// Inference folds batchnorm into the conv: w' = w * scale, b' = (b - running_mean) * scale + beta
// with scale = gamma / sqrt(running_var + eps). Returns whether every b' is finite.
template <typename T>
bool fold_bn(const Conv1dShape& s, const T* bias, const T* gamma, const T* beta,
             const T* running_mean, const T* running_var, double eps, double* scale, T* bf) {
  bool finite = true;
  for (i64 co = 0; co < s.Cout; ++co) {
    scale[co] = gamma[co] / std::sqrt(static_cast<double>(running_var[co]) + eps);
    const double b0 = bias ? bias[co] : 0.0;
    bf[co] = static_cast<T>((b0 - running_mean[co]) * scale[co] + beta[co]);
    finite = finite && std::isfinite(bf[co]);
  }
  return finite;
}

template <typename T>
void forward_train_impl(const Conv1dShape& s, const T* x, const T* w, const T* bias, const T* gamma,
                        const T* beta, T* running_mean, T* running_var, double eps, double momentum,
                        bool batch_stats, T* z, T* mean, T* invstd, T* y, bool relu) {
  using V = typename VecOf<T>::type;
  const i64 Lo = s.Lout();
  Buf<T> wp(packed_size_forward<V>(s));
  pack_forward<V>(s, w, wp.p);
  const Chunks ch = make_chunks<V>(s.N, Lo, s.Cin * s.stride * i64(sizeof(T)));
  const i64 nunits = s.N * ch.nch;
  if (batch_stats) {
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
      batch_stats_of(co, mu, m2 / M, eps, momentum, mean, invstd, running_mean, running_var);
    }
  } else {
    conv_forward_all<V, E_STORE>(s, x, wp.p, bias, z, nullptr, ch);
    for (i64 co = 0; co < s.Cout; ++co)
      running_stats_of(co, eps, running_mean, running_var, mean, invstd);
  }
  normalize_relu<V>(s, z, gamma, beta, mean, invstd, y, relu);
}

// The inference forward's folded weights: the packed w * scale, then the folded bias b'.
// Returns whether every value is finite.
template <class V>
bool fold_and_pack(const Conv1dShape& s, const typename V::T* w, const typename V::T* bias,
                   const typename V::T* gamma, const typename V::T* beta,
                   const typename V::T* running_mean, const typename V::T* running_var, double eps,
                   typename V::T* wp, typename V::T* bf) {
  Buf<double> scale(s.Cout);
  bool finite = fold_bn(s, bias, gamma, beta, running_mean, running_var, eps, scale.p, bf);
  pack_forward<V>(s, w, wp, scale.p);
  const i64 np = packed_size_forward<V>(s);
  for (i64 i = 0; i < np && finite; ++i) finite = std::isfinite(wp[i]);
  return finite;
}

template <typename T>
void forward_infer_impl(const Conv1dShape& s, const T* x, const T* w, const T* bias, const T* gamma,
                        const T* beta, const T* running_mean, const T* running_var, double eps,
                        T* y, bool relu) {
  using V = typename VecOf<T>::type;
  const i64 np = packed_size_forward<V>(s), C = s.Cout;
  // The folded weights depend on these inputs only (pack_cache.h): the same bytes give the
  // same packed weights, so a stored copy is reused instead of packing again.
  const i64 hdr[] = {kIsaId, i64(sizeof(T)), V::MR, s.Cout, s.Cin, s.K, s.groups};
  const size_t tb = sizeof(T), cb = size_t(C) * tb;
  const Span in[] = {{w, size_t(C * (s.Cin / s.groups) * s.K) * tb},
                     {hdr, sizeof hdr},
                     {&eps, sizeof eps},
                     {bias, bias ? cb : 0},
                     {gamma, cb},
                     {beta, cb},
                     {running_mean, cb},
                     {running_var, cb}};
  const int nin = int(sizeof in / sizeof in[0]);
  const size_t result_bytes = size_t(np + C) * tb;
  const PackCacheRef cached(in, nin, result_bytes);
  Buf<T> own(cached.l.data ? 0 : np + C);
  const T* wp = cached.l.data ? static_cast<const T*>(cached.l.data) : own.p;
  if (!cached.l.data) {
    const bool finite = fold_and_pack<V>(s, w, bias, gamma, beta, running_mean, running_var, eps,
                                         own.p, own.p + np);
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
    if (cached.l.store) pack_cache_store(in, nin, own.p, result_bytes);
  }
  const T* bf = wp + np;
  const Chunks ch = make_chunks<V>(s.N, s.Lout(), s.Cin * s.stride * i64(sizeof(T)));
  if (relu)
    conv_forward_all<V, E_RELU>(s, x, wp, bf, y, nullptr, ch);
  else
    conv_forward_all<V, E_STORE>(s, x, wp, bf, y, nullptr, ch);
}

}  // namespace
}  // namespace FUSEDRES_ISA_NS
}  // namespace fusedres
