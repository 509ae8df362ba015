// Natural logs of float32 lanes for the AVX2 build's BCE loops, in place of Sleef's
// (Vectorized<float>::log, ::log1p), which bound those loops. Each is an exponent and mantissa
// split and Cephes' logf polynomial on log(1 + f), |f| < sqrt(2) - 1, in adds and multiplies only
// (no FMA, see avx2_target.h). tests/test_vae_loss.py measures their error against float64 math
// over every binade BCE reaches and states the bound in ulps.
//
// They replace bce_log_ and log1p_exp_neg_ of fastvae_math.h for Vectorized<float> in the AVX2
// build only. Its float64 lanes keep Sleef's logs; the baseline build, the scalar tails and the
// CUDA kernels keep the C library's (or CUDA's).
#pragma once

#include "cpu_vec.h"
#include "fastvae_math.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

namespace fastvae {
namespace cpu {
inline namespace CPU_CAPABILITY {

// k ln 2 + log(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1]; ln 2 is split in two so that k ln 2
// adds no rounding of its own for any exponent k of a float. The polynomial is evaluated by
// Estrin's scheme rather than Horner's: the loops are bound by this dependency chain's latency.
C10_ALWAYS_INLINE __m256 log1p_reduced(__m256 f, __m256 k) {
  const auto linear = [f](float c0, float c1) {
    return _mm256_add_ps(_mm256_set1_ps(c0), _mm256_mul_ps(_mm256_set1_ps(c1), f));
  };
  const __m256 f2 = _mm256_mul_ps(f, f);
  const __m256 f4 = _mm256_mul_ps(f2, f2);
  const __m256 p01 = linear(3.3333331174e-1f, -2.4999993993e-1f);
  const __m256 p23 = linear(2.0000714765e-1f, -1.6668057665e-1f);
  const __m256 p45 = linear(1.4249322787e-1f, -1.2420140846e-1f);
  const __m256 p67 = linear(1.1676998740e-1f, -1.1514610310e-1f);
  const __m256 p03 = _mm256_add_ps(p01, _mm256_mul_ps(p23, f2));
  const __m256 p47 = _mm256_add_ps(p45, _mm256_mul_ps(p67, f2));
  const __m256 p48 = _mm256_add_ps(p47, _mm256_mul_ps(_mm256_set1_ps(7.0376836292e-2f), f4));
  const __m256 p = _mm256_add_ps(p03, _mm256_mul_ps(p48, f4));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), f2);
  y = _mm256_add_ps(y, _mm256_mul_ps(k, _mm256_set1_ps(-2.12194440e-4f)));
  y = _mm256_sub_ps(y, _mm256_mul_ps(_mm256_set1_ps(0.5f), f2));
  return _mm256_add_ps(_mm256_add_ps(f, y), _mm256_mul_ps(k, _mm256_set1_ps(0.693359375f)));
}

// log(x) per lane for x positive, normal and finite, less exponent_offset ln 2.
C10_ALWAYS_INLINE __m256 log_normal(__m256 x, __m256 exponent_offset) {
  // x = m 2^e with m in [1/2, 1); below sqrt(1/2), take 2m and e - 1 so that f = m - 1 stays small.
  const __m256i bits = _mm256_castps_si256(x);
  const __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  const __m256 low = _mm256_cmp_ps(m, _mm256_set1_ps(0.70710678f), _CMP_LT_OQ);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  e = _mm256_sub_ps(e, _mm256_add_ps(exponent_offset, _mm256_and_ps(low, _mm256_set1_ps(1.0f))));
  const __m256 f = _mm256_sub_ps(_mm256_blendv_ps(m, _mm256_add_ps(m, m), low), _mm256_set1_ps(1.0f));
  return log1p_reduced(f, e);
}

// log(v) per lane: -inf at +-0 (subnormals are scaled into the normal range first), NaN below 0
// and at NaN, +inf at +inf, exactly 0 at 1. Vectors of positive normal floats, all the BCE loops
// see short of saturated probabilities, skip the special cases.
inline at::vec::Vectorized<float> fast_log(const at::vec::Vectorized<float>& v) {
  const __m256 x0 = v;
  const __m256 normal = _mm256_and_ps(_mm256_cmp_ps(x0, _mm256_set1_ps(0x1p-126f), _CMP_GE_OQ),
                                      _mm256_cmp_ps(x0, _mm256_set1_ps(INFINITY), _CMP_LT_OQ));
  if (_mm256_movemask_ps(normal) == 0xff) return log_normal(x0, _mm256_setzero_ps());
  const __m256 subnormal = _mm256_cmp_ps(x0, _mm256_set1_ps(0x1p-126f), _CMP_LT_OQ);
  const __m256 x = _mm256_blendv_ps(x0, _mm256_mul_ps(x0, _mm256_set1_ps(0x1p23f)), subnormal);
  __m256 out = log_normal(x, _mm256_and_ps(subnormal, _mm256_set1_ps(23.0f)));
  out = _mm256_blendv_ps(out, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(x0, _mm256_setzero_ps(), _CMP_EQ_OQ));
  out = _mm256_blendv_ps(out, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x0, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  return _mm256_blendv_ps(out, _mm256_set1_ps(NAN), _mm256_cmp_ps(x0, _mm256_setzero_ps(), _CMP_NGE_UQ));
}

// log1p(e) per lane for e in [0, 1] (NaN stays NaN), with no rounding of 1 + e: f is e itself up
// to sqrt(2) - 1, and (e - 1) / 2 with k = 1 above.
inline at::vec::Vectorized<float> fast_log1p_unit(const at::vec::Vectorized<float>& v) {
  const __m256 e = v;
  const __m256 high = _mm256_cmp_ps(e, _mm256_set1_ps(0.41421356f), _CMP_GT_OQ);
  const __m256 half_e_less_1 = _mm256_mul_ps(_mm256_sub_ps(e, _mm256_set1_ps(1.0f)), _mm256_set1_ps(0.5f));
  const __m256 f = _mm256_blendv_ps(e, half_e_less_1, high);
  return log1p_reduced(f, _mm256_and_ps(high, _mm256_set1_ps(1.0f)));
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu

template <>
inline at::vec::Vectorized<float> bce_log_(at::vec::Vectorized<float> v) {
  return cpu::fast_log(v);
}

template <>
inline at::vec::Vectorized<float> log1p_exp_neg_(at::vec::Vectorized<float> a) {
  return cpu::fast_log1p_unit(exp_(at::vec::Vectorized<float>(0) - a));
}

}  // namespace fastvae
#endif
