// Logs and an exp of float32 lanes for the AVX2 build's BCE loops, in place of Sleef's
// (Vectorized<float>::log, ::log1p, ::exp), which bound those loops. The logs are an exponent and
// mantissa split and Cephes' logf polynomial on log(1 + f), |f| < sqrt(2) - 1; the exp is Cephes'
// expf. Both are in explicit FMAs (the only ones the AVX2 build has, see avx2_target.h).
// tests/test_vae_loss.py measures their error against float64 math over every binade BCE reaches
// and states the bound in ulps.
//
// They replace bce_clamped_log_, bce_exp_ and bce_log1p_ of fastvae_math.h for Vectorized<float>
// in the AVX2 build only. Its float64 lanes keep Sleef's; the baseline build, the scalar tails and
// the CUDA kernels keep the C library's (or CUDA's).
#pragma once

#include "cpu_vec.h"
#include "fastvae_math.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

namespace fastvae {
namespace cpu {
inline namespace CPU_CAPABILITY {

C10_ALWAYS_INLINE __m256 splat(float v) { return _mm256_set1_ps(v); }

// ln 2 in two parts, Cephes': kLn2Hi has few enough mantissa bits that n kLn2Hi is exact for any
// exponent n of a float, and kLn2Hi + kLn2Lo is ln 2 to float precision.
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;

// k ln 2 + log(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1], with ln 2 in its two parts so that
// k ln 2 adds no rounding of its own. The polynomial is evaluated by
// Estrin's scheme rather than Horner's: the loops are bound by this dependency chain's latency.
C10_ALWAYS_INLINE __m256 log1p_reduced(__m256 f, __m256 k) {
  const __m256 f2 = _mm256_mul_ps(f, f);
  const __m256 f4 = _mm256_mul_ps(f2, f2);
  const __m256 p01 = _mm256_fmadd_ps(splat(-2.4999993993e-1f), f, splat(3.3333331174e-1f));
  const __m256 p23 = _mm256_fmadd_ps(splat(-1.6668057665e-1f), f, splat(2.0000714765e-1f));
  const __m256 p45 = _mm256_fmadd_ps(splat(-1.2420140846e-1f), f, splat(1.4249322787e-1f));
  const __m256 p67 = _mm256_fmadd_ps(splat(-1.1514610310e-1f), f, splat(1.1676998740e-1f));
  const __m256 p03 = _mm256_fmadd_ps(p23, f2, p01);
  const __m256 p47 = _mm256_fmadd_ps(p67, f2, p45);
  const __m256 p48 = _mm256_fmadd_ps(splat(7.0376836292e-2f), f4, p47);
  const __m256 p = _mm256_fmadd_ps(p48, f4, p03);
  // f^3 p(f) - f^2 / 2 + f, then k ln 2 in its two parts, smallest first.
  __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(p, f), f2, _mm256_mul_ps(k, splat(kLn2Lo)));
  y = _mm256_fnmadd_ps(splat(0.5f), f2, y);
  return _mm256_fmadd_ps(k, splat(kLn2Hi), _mm256_add_ps(f, y));
}

// log(x) per lane for x positive, normal and finite, less exponent_offset ln 2.
C10_ALWAYS_INLINE __m256 log_normal(__m256 x, __m256 exponent_offset) {
  // x = m 2^k with m in [sqrt(1/2), sqrt(2)): subtracting sqrt(1/2)'s bits leaves k in the
  // exponent field (one less where the mantissa is below sqrt(1/2)'s), and taking k back out of
  // x's bits leaves m. m - 1 is exact.
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i k = _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f3504f3)), 23);
  const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(k, 23)));
  return log1p_reduced(_mm256_sub_ps(m, splat(1.0f)), _mm256_sub_ps(_mm256_cvtepi32_ps(k), exponent_offset));
}

// max(log(v), -100) per lane, as torch's BCE clamps it: -100 at +-0 and at subnormals below
// e^-100 (the others are scaled into the normal range first), NaN below 0 and at NaN, +inf at
// +inf, exactly 0 at 1. Vectors of positive normal floats, all the BCE loops see short of
// saturated probabilities, skip the special cases and the clamp (their logs are above -88).
inline at::vec::Vectorized<float> fast_clamped_log(const at::vec::Vectorized<float>& v) {
  const __m256 x0 = v;
  const __m256 normal = _mm256_and_ps(_mm256_cmp_ps(x0, splat(0x1p-126f), _CMP_GE_OQ),
                                      _mm256_cmp_ps(x0, splat(INFINITY), _CMP_LT_OQ));
  if (_mm256_movemask_ps(normal) == 0xff) return log_normal(x0, _mm256_setzero_ps());
  const __m256 subnormal = _mm256_cmp_ps(x0, splat(0x1p-126f), _CMP_LT_OQ);
  const __m256 x = _mm256_blendv_ps(x0, _mm256_mul_ps(x0, splat(0x1p23f)), subnormal);
  __m256 out = log_normal(x, _mm256_and_ps(subnormal, splat(23.0f)));
  out = _mm256_blendv_ps(out, splat(-INFINITY), _mm256_cmp_ps(x0, _mm256_setzero_ps(), _CMP_EQ_OQ));
  out = _mm256_blendv_ps(out, splat(INFINITY), _mm256_cmp_ps(x0, splat(INFINITY), _CMP_EQ_OQ));
  out = _mm256_max_ps(out, splat(static_cast<float>(kBceLogFloor)));
  return _mm256_blendv_ps(out, splat(NAN), _mm256_cmp_ps(x0, _mm256_setzero_ps(), _CMP_NGE_UQ));
}

// log1p(e) per lane for e in [0, 1] (NaN stays NaN), never rounding 1 + e: f is e itself up to
// sqrt(2) - 1, and (e - 1) / 2 with k = 1 above (one rounding, in the last bit, below e = 1/2).
inline at::vec::Vectorized<float> fast_log1p_unit(const at::vec::Vectorized<float>& v) {
  const __m256 e = v;
  const __m256 high = _mm256_cmp_ps(e, splat(0.41421356f), _CMP_GT_OQ);
  const __m256 half_e_less_1 = _mm256_fmsub_ps(e, splat(0.5f), splat(0.5f));
  const __m256 f = _mm256_blendv_ps(e, half_e_less_1, high);
  return log1p_reduced(f, _mm256_and_ps(high, splat(1.0f)));
}

// exp(v) per lane for v <= 0 (NaN stays NaN). Where every lane is at least -87, so that the
// result is a normal float: v = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 in its two parts),
// Cephes' expf polynomial for exp(r), and 2^n put straight into the exponent field. Other vectors,
// rare in the BCE loops (a logit past 87 in magnitude), take Sleef's exp for its subnormals.
inline at::vec::Vectorized<float> fast_exp_nonpositive(const at::vec::Vectorized<float>& v) {
  const __m256 x = v;
  if (_mm256_movemask_ps(_mm256_cmp_ps(x, splat(-87.0f), _CMP_GE_OQ)) != 0xff) return v.exp();
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, splat(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, splat(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, splat(kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(splat(1.9875691500e-4f), r, splat(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, splat(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, splat(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, splat(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, splat(5.0000001201e-1f));
  const __m256 exp_r = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), splat(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(exp_r, _mm256_castsi256_ps(scale));
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu

template <>
inline at::vec::Vectorized<float> bce_clamped_log_(at::vec::Vectorized<float> v) {
  return cpu::fast_clamped_log(v);
}

template <>
inline at::vec::Vectorized<float> bce_exp_(at::vec::Vectorized<float> v) {
  return cpu::fast_exp_nonpositive(v);
}

template <>
inline at::vec::Vectorized<float> bce_log1p_(at::vec::Vectorized<float> e) {
  return cpu::fast_log1p_unit(e);
}

}  // namespace fastvae
#endif
