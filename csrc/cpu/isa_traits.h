// Vector traits for the conv engine (conv_engine.h), one set per instruction set. Each ISA
// translation unit (isa_*.cpp) is compiled with its own flags, defines FUSEDRES_ISA_AVX512,
// FUSEDRES_ISA_AVX2 or nothing (portable scalar), includes this file and then the engine.
// Everything lives in an anonymous namespace so no inline function or template instance can
// be shared (and picked by the linker) across translation units built for different CPUs.
#pragma once
#include <cstdint>
#if defined(FUSEDRES_ISA_AVX512) || defined(FUSEDRES_ISA_AVX2)
#include <immintrin.h>
#endif

#define FR_INLINE inline __attribute__((always_inline))

namespace fusedres {
namespace FUSEDRES_ISA_NS {
namespace {

// Interface (T: element type, W lanes; MR x NR*W conv tile; DMR x DNR*W weight-grad tile;
// RNR*W positions of one row in the depthwise convolution):
//   zero set1 load loadm store storem fma(a,b,c)=a*b+c add sub mul max maskz(m,v) range(lo,hi)
//   (lanes lo <= i < hi) gt0(v) (v > 0) nan(v) (v is NaN) select(m,a,b) (a where m, else
//   b) mand hsum. max(a, b) returns b where either is NaN (x86's maxps; VScalar mirrors it).
#if defined(FUSEDRES_ISA_AVX512)
struct VF {
  using T = float;
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int W = 16, MR = 8, NR = 3, DMR = 6, DNR = 4, RNR = 12;
  static FR_INLINE reg zero() { return _mm512_setzero_ps(); }
  static FR_INLINE reg set1(T a) { return _mm512_set1_ps(a); }
  static FR_INLINE reg load(const T* p) { return _mm512_loadu_ps(p); }
  static FR_INLINE reg loadm(const T* p, mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static FR_INLINE void store(T* p, reg v) { _mm512_storeu_ps(p, v); }
  static FR_INLINE void storem(T* p, reg v, mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static FR_INLINE reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static FR_INLINE reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static FR_INLINE reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static FR_INLINE reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static FR_INLINE reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static FR_INLINE reg maskz(mask m, reg v) { return _mm512_maskz_mov_ps(m, v); }
  static FR_INLINE mask range(int lo, int hi) {
    return hi <= lo ? mask(0) : mask(((1u << hi) - 1u) & ~((1u << lo) - 1u));
  }
  static FR_INLINE mask gt0(reg v) { return _mm512_cmp_ps_mask(v, zero(), _CMP_GT_OQ); }
  static FR_INLINE mask nan(reg v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }
  static FR_INLINE reg select(mask m, reg a, reg b) { return _mm512_mask_blend_ps(m, b, a); }
  static FR_INLINE mask mand(mask a, mask b) { return mask(a & b); }
  static FR_INLINE T hsum(reg v) { return _mm512_reduce_add_ps(v); }
  // dst[i * ldd + j] = src[j * lds + i] for a W x W block.
  static constexpr bool TRANSPOSE = true;
  static FR_INLINE void transpose(const T* src, int64_t lds, T* dst, int64_t ldd) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int b = 0; b < 4; ++b) {
      t[b] = _mm512_shuffle_f32x4(r[b], r[4 + b], 0x88);
      t[4 + b] = _mm512_shuffle_f32x4(r[b], r[4 + b], 0xdd);
      t[8 + b] = _mm512_shuffle_f32x4(r[8 + b], r[12 + b], 0x88);
      t[12 + b] = _mm512_shuffle_f32x4(r[8 + b], r[12 + b], 0xdd);
    }
    for (int b = 0; b < 4; ++b) {
      _mm512_storeu_ps(dst + b * ldd, _mm512_shuffle_f32x4(t[b], t[8 + b], 0x88));
      _mm512_storeu_ps(dst + (4 + b) * ldd, _mm512_shuffle_f32x4(t[4 + b], t[12 + b], 0x88));
      _mm512_storeu_ps(dst + (8 + b) * ldd, _mm512_shuffle_f32x4(t[b], t[8 + b], 0xdd));
      _mm512_storeu_ps(dst + (12 + b) * ldd, _mm512_shuffle_f32x4(t[4 + b], t[12 + b], 0xdd));
    }
  }
};
struct VD {
  using T = double;
  using reg = __m512d;
  using mask = __mmask8;
  static constexpr int W = 8, MR = 8, NR = 3, DMR = 6, DNR = 4, RNR = 12;
  static FR_INLINE reg zero() { return _mm512_setzero_pd(); }
  static FR_INLINE reg set1(T a) { return _mm512_set1_pd(a); }
  static FR_INLINE reg load(const T* p) { return _mm512_loadu_pd(p); }
  static FR_INLINE reg loadm(const T* p, mask m) { return _mm512_maskz_loadu_pd(m, p); }
  static FR_INLINE void store(T* p, reg v) { _mm512_storeu_pd(p, v); }
  static FR_INLINE void storem(T* p, reg v, mask m) { _mm512_mask_storeu_pd(p, m, v); }
  static FR_INLINE reg fma(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static FR_INLINE reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static FR_INLINE reg sub(reg a, reg b) { return _mm512_sub_pd(a, b); }
  static FR_INLINE reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static FR_INLINE reg max(reg a, reg b) { return _mm512_max_pd(a, b); }
  static FR_INLINE reg maskz(mask m, reg v) { return _mm512_maskz_mov_pd(m, v); }
  static FR_INLINE mask range(int lo, int hi) {
    return hi <= lo ? mask(0) : mask(((1u << hi) - 1u) & ~((1u << lo) - 1u));
  }
  static FR_INLINE mask gt0(reg v) { return _mm512_cmp_pd_mask(v, zero(), _CMP_GT_OQ); }
  static FR_INLINE mask nan(reg v) { return _mm512_cmp_pd_mask(v, v, _CMP_UNORD_Q); }
  static FR_INLINE reg select(mask m, reg a, reg b) { return _mm512_mask_blend_pd(m, b, a); }
  static FR_INLINE mask mand(mask a, mask b) { return mask(a & b); }
  static FR_INLINE T hsum(reg v) { return _mm512_reduce_add_pd(v); }
  static constexpr bool TRANSPOSE = false;
  static FR_INLINE void transpose(const T*, int64_t, T*, int64_t) {}
};
#elif defined(FUSEDRES_ISA_AVX2)
struct VF {
  using T = float;
  using reg = __m256;
  using mask = __m256i;
  static constexpr int W = 8, MR = 6, NR = 2, DMR = 4, DNR = 3, RNR = 6;
  static FR_INLINE reg zero() { return _mm256_setzero_ps(); }
  static FR_INLINE reg set1(T a) { return _mm256_set1_ps(a); }
  static FR_INLINE reg load(const T* p) { return _mm256_loadu_ps(p); }
  static FR_INLINE reg loadm(const T* p, mask m) { return _mm256_maskload_ps(p, m); }
  static FR_INLINE void store(T* p, reg v) { _mm256_storeu_ps(p, v); }
  static FR_INLINE void storem(T* p, reg v, mask m) { _mm256_maskstore_ps(p, m, v); }
  static FR_INLINE reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static FR_INLINE reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static FR_INLINE reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static FR_INLINE reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static FR_INLINE reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static FR_INLINE reg maskz(mask m, reg v) { return _mm256_and_ps(_mm256_castsi256_ps(m), v); }
  static FR_INLINE mask range(int lo, int hi) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_and_si256(_mm256_cmpgt_epi32(iota, _mm256_set1_epi32(lo - 1)),
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), iota));
  }
  static FR_INLINE mask gt0(reg v) {
    return _mm256_castps_si256(_mm256_cmp_ps(v, zero(), _CMP_GT_OQ));
  }
  static FR_INLINE mask nan(reg v) {
    return _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  static FR_INLINE reg select(mask m, reg a, reg b) {
    return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m));
  }
  static FR_INLINE mask mand(mask a, mask b) { return _mm256_and_si256(a, b); }
  static FR_INLINE T hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static constexpr bool TRANSPOSE = true;
  static FR_INLINE void transpose(const T* src, int64_t lds, T* dst, int64_t ldd) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int b = 0; b < 4; ++b) {
      _mm256_storeu_ps(dst + b * ldd, _mm256_permute2f128_ps(r[b], r[4 + b], 0x20));
      _mm256_storeu_ps(dst + (4 + b) * ldd, _mm256_permute2f128_ps(r[b], r[4 + b], 0x31));
    }
  }
};
struct VD {
  using T = double;
  using reg = __m256d;
  using mask = __m256i;
  static constexpr int W = 4, MR = 6, NR = 2, DMR = 4, DNR = 3, RNR = 6;
  static FR_INLINE reg zero() { return _mm256_setzero_pd(); }
  static FR_INLINE reg set1(T a) { return _mm256_set1_pd(a); }
  static FR_INLINE reg load(const T* p) { return _mm256_loadu_pd(p); }
  static FR_INLINE reg loadm(const T* p, mask m) { return _mm256_maskload_pd(p, m); }
  static FR_INLINE void store(T* p, reg v) { _mm256_storeu_pd(p, v); }
  static FR_INLINE void storem(T* p, reg v, mask m) { _mm256_maskstore_pd(p, m, v); }
  static FR_INLINE reg fma(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static FR_INLINE reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  static FR_INLINE reg sub(reg a, reg b) { return _mm256_sub_pd(a, b); }
  static FR_INLINE reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
  static FR_INLINE reg max(reg a, reg b) { return _mm256_max_pd(a, b); }
  static FR_INLINE reg maskz(mask m, reg v) { return _mm256_and_pd(_mm256_castsi256_pd(m), v); }
  static FR_INLINE mask range(int lo, int hi) {
    const __m256i iota = _mm256_setr_epi64x(0, 1, 2, 3);
    return _mm256_and_si256(_mm256_cmpgt_epi64(iota, _mm256_set1_epi64x(lo - 1)),
                            _mm256_cmpgt_epi64(_mm256_set1_epi64x(hi), iota));
  }
  static FR_INLINE mask gt0(reg v) {
    return _mm256_castpd_si256(_mm256_cmp_pd(v, zero(), _CMP_GT_OQ));
  }
  static FR_INLINE mask nan(reg v) {
    return _mm256_castpd_si256(_mm256_cmp_pd(v, v, _CMP_UNORD_Q));
  }
  static FR_INLINE reg select(mask m, reg a, reg b) {
    return _mm256_blendv_pd(b, a, _mm256_castsi256_pd(m));
  }
  static FR_INLINE mask mand(mask a, mask b) { return _mm256_and_si256(a, b); }
  static FR_INLINE T hsum(reg v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static constexpr bool TRANSPOSE = false;
  static FR_INLINE void transpose(const T*, int64_t, T*, int64_t) {}
};
#else
// Portable scalar "vectors" of one lane; the compiler may still vectorize around them.
template <typename TT>
struct VScalar {
  using T = TT;
  using reg = TT;
  using mask = bool;
  static constexpr int W = 1, MR = 4, NR = 4, DMR = 4, DNR = 4, RNR = 8;
  static FR_INLINE reg zero() { return T(0); }
  static FR_INLINE reg set1(T a) { return a; }
  static FR_INLINE reg load(const T* p) { return *p; }
  static FR_INLINE reg loadm(const T* p, mask m) { return m ? *p : T(0); }
  static FR_INLINE void store(T* p, reg v) { *p = v; }
  static FR_INLINE void storem(T* p, reg v, mask m) {
    if (m) *p = v;
  }
  static FR_INLINE reg fma(reg a, reg b, reg c) { return a * b + c; }  // -ffp-contract=off
  static FR_INLINE reg add(reg a, reg b) { return a + b; }
  static FR_INLINE reg sub(reg a, reg b) { return a - b; }
  static FR_INLINE reg mul(reg a, reg b) { return a * b; }
  static FR_INLINE reg max(reg a, reg b) { return a > b ? a : b; }
  static FR_INLINE reg maskz(mask m, reg v) { return m ? v : T(0); }
  static FR_INLINE mask range(int lo, int hi) { return lo <= 0 && hi >= 1; }
  static FR_INLINE mask gt0(reg v) { return v > T(0); }
  static FR_INLINE mask nan(reg v) { return v != v; }
  static FR_INLINE reg select(mask m, reg a, reg b) { return m ? a : b; }
  static FR_INLINE mask mand(mask a, mask b) { return a && b; }
  static FR_INLINE T hsum(reg v) { return v; }
  static constexpr bool TRANSPOSE = false;
  static FR_INLINE void transpose(const T*, int64_t, T*, int64_t) {}
};
using VF = VScalar<float>;
using VD = VScalar<double>;
#endif

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = VF;
};
template <>
struct VecOf<double> {
  using type = VD;
};

}  // namespace
}  // namespace FUSEDRES_ISA_NS
}  // namespace fusedres
