// The loops of reparameterize_kl on CPU. Compiled twice, like vae_loss_cpu_kernels.h: for the
// x86-64 baseline by reparameterize_kl_cpu.cpp and with AVX2 by reparameterize_kl_cpu_avx2.cpp.
//
// Float-accumulating dtypes (float32, float16, bfloat16) run on Vectorized<float> lanes: the
// Philox rounds in a lane loop the compiler vectorizes (integer math, so exact), Box-Muller and
// the rest with at::vec's functions, which in the AVX2 build are Sleef's (within 1 ulp of the C
// library's, so eps may differ from the scalar path in its last bit). float64 and the tails run
// the scalar path. Both paths evaluate the templates of fastvae_math.h. The backward draws no
// noise: it reads the float32 eps the forward saved (see reparameterize_kl_cpu.cpp).
#pragma once

#include <type_traits>

#include <c10/util/Exception.h>

#include "../cpu_vec.h"
#include "../fastvae_math.h"

namespace fastvae::cpu {

// What the forward writes besides z: nothing, the elementwise KL, or (returned) its sum.
enum class KlOutput { None, Elementwise, Sum };

// What the backward reads.
template <typename scalar_t>
struct LatentGradInputs {
  const scalar_t* grad_z;          // null when z gets no gradient
  const float* noise;              // the forward's eps, read when grad_z is not null
  const acc_t<scalar_t>* grad_kl;  // elementwise gradient of an unreduced KL, or null
  bool has_kl;                     // whether the KL gets a gradient
  acc_t<scalar_t> kl_weight;       // the gradient of each KL term when grad_kl is null
  const scalar_t* mu;
  const scalar_t* logvar;
};

// The AVX2 build's entry points, defined in reparameterize_kl_cpu_avx2.cpp for the four dtypes.
template <typename scalar_t>
acc_t<scalar_t> sample_forward_avx2(const scalar_t* mu, const scalar_t* logvar, uint64_t seed, scalar_t* z,
                                    float* noise, acc_t<scalar_t>* kl, KlOutput kl_output, int64_t begin,
                                    int64_t end);
template <typename scalar_t>
void sample_backward_avx2(const LatentGradInputs<scalar_t>& in, scalar_t* grad_mu, scalar_t* grad_logvar,
                          int64_t begin, int64_t end);

inline namespace CPU_CAPABILITY {

// The gradients of one element, or of one vector of elements (T the accumulate type or a
// Vectorized of it), from what the backward read for it.
template <typename T>
C10_ALWAYS_INLINE void latent_grads(bool has_grad_z, bool has_kl, T grad_z, T eps, T kl_weight, T mu, T logvar,
                                    T& grad_mu, T& grad_logvar) {
  grad_mu = T(0);
  grad_logvar = T(0);
  if (has_grad_z) {
    grad_mu = grad_mu + grad_z;
    grad_logvar = grad_logvar + grad_z * reparameterize_grad_logvar(logvar, eps);
  }
  if (has_kl) {
    grad_mu = grad_mu + kl_weight * kl_grad_mu(mu);
    grad_logvar = grad_logvar + kl_weight * kl_grad_logvar(logvar);
  }
}

using FloatVec = at::vec::Vectorized<float>;

#if defined(CPU_CAPABILITY_AVX2)
// Eight uint32 lanes with the operations philox4x32_10_inplace needs. AVX2 has no 32-bit
// high multiply: the even lanes' and the odd lanes' 64-bit products are taken apart and blended.
struct U32x8 {
  __m256i v;
};
C10_ALWAYS_INLINE U32x8 operator^(U32x8 a, U32x8 b) { return {_mm256_xor_si256(a.v, b.v)}; }
C10_ALWAYS_INLINE U32x8 operator^(U32x8 a, uint32_t b) {
  return {_mm256_xor_si256(a.v, _mm256_set1_epi32(static_cast<int>(b)))};
}
C10_ALWAYS_INLINE U32x8 operator*(uint32_t a, U32x8 b) {
  return {_mm256_mullo_epi32(_mm256_set1_epi32(static_cast<int>(a)), b.v)};
}
C10_ALWAYS_INLINE U32x8 mulhi32(uint32_t a, U32x8 b) {
  const __m256i k = _mm256_set1_epi32(static_cast<int>(a));
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(k, b.v), 32);
  const __m256i odd = _mm256_mul_epu32(k, _mm256_srli_epi64(b.v, 32));
  return {_mm256_blend_epi32(even, odd, 0xAA)};
}
#endif

// philox_normal for the FloatVec::size() elements from index `first` on.
C10_ALWAYS_INLINE FloatVec philox_normal_vec(uint64_t seed, uint64_t first) {
  constexpr int kLanes = FloatVec::size();
#if defined(CPU_CAPABILITY_AVX2)
  static_assert(kLanes == 8);
  // The counters (first + lane) split into 32-bit halves. Vectors start at multiples of the lane
  // count (chunks are multiples of it), and so does 2**32: no lane's low half wraps.
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(first % kLanes == 0);
  const uint32_t first_lo = static_cast<uint32_t>(first), first_hi = static_cast<uint32_t>(first >> 32);
  U32x8 c0{_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
  U32x8 c1{_mm256_set1_epi32(static_cast<int>(first_hi))};
  U32x8 c2{_mm256_setzero_si256()}, c3{_mm256_setzero_si256()};
  philox4x32_10_inplace(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  // uint_to_uniform on lanes: x < 0 ? ~x : x is x ^ (x >> 31) with an arithmetic shift, and the
  // int32 -> float conversion rounds to nearest, as the scalar cast does.
  const auto to_uniform = [](__m256i bits) {
    const __m256i folded = _mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31));
    return FloatVec(_mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(kUniformScale)));
  };
  return uniform_pair_to_normal(to_uniform(c0.v), to_uniform(c1.v));
#else
  alignas(32) float u1[kLanes], u2[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const UniformPair u = philox_uniform_pair(seed, first + l);
    u1[l] = u.u1;
    u2[l] = u.u2;
  }
  return uniform_pair_to_normal(FloatVec::loadu(u1), FloatVec::loadu(u2));
#endif
}

// z and the eps it was drawn with (each where not null) and the KL of [begin, end); returns the
// KL's sum when kl_output is Sum, added in a fixed order (lanes, then the tail) so it does not
// depend on the thread count. noise is written only along with z.
template <typename scalar_t>
acc_t<scalar_t> sample_forward(const scalar_t* mu, const scalar_t* logvar, uint64_t seed, scalar_t* z, float* noise,
                               acc_t<scalar_t>* kl, KlOutput kl_output, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  acc total = 0;
  int64_t i = begin;
  if constexpr (std::is_same_v<acc, float>) {
    FloatVec sum(0);
    for (; i + FloatVec::size() <= end; i += FloatVec::size()) {
      const FloatVec m = load_widened(mu + i), lv = load_widened(logvar + i);
      if (z != nullptr) {
        const FloatVec eps = philox_normal_vec(seed, i);
        store_narrowed(z + i, reparameterize(m, lv, eps));
        if (noise != nullptr) eps.store(noise + i);
      }
      if (kl_output == KlOutput::Elementwise) {
        kl_term(m, lv).store(kl + i);
      } else if (kl_output == KlOutput::Sum) {
        sum = sum + kl_term(m, lv);
      }
    }
    total = lane_sum(sum);
  }
  for (; i < end; ++i) {
    const acc m = mu[i], lv = logvar[i];
    if (z != nullptr) {
      const float eps = philox_normal(seed, i);
      z[i] = static_cast<scalar_t>(reparameterize<acc>(m, lv, eps));
      if (noise != nullptr) noise[i] = eps;
    }
    if (kl_output == KlOutput::Elementwise) {
      kl[i] = kl_term(m, lv);
    } else if (kl_output == KlOutput::Sum) {
      total += kl_term(m, lv);
    }
  }
  return total;
}

template <typename scalar_t>
void sample_backward(const LatentGradInputs<scalar_t>& in, scalar_t* grad_mu, scalar_t* grad_logvar, int64_t begin,
                     int64_t end) {
  using acc = acc_t<scalar_t>;
  const bool has_grad_z = in.grad_z != nullptr;
  int64_t i = begin;
  if constexpr (std::is_same_v<acc, float>) {
    const FloatVec zero(0), weight(in.kl_weight);
    for (; i + FloatVec::size() <= end; i += FloatVec::size()) {
      const FloatVec g_z = has_grad_z ? load_widened(in.grad_z + i) : zero;
      const FloatVec eps = has_grad_z ? FloatVec::loadu(in.noise + i) : zero;
      const FloatVec w = in.grad_kl != nullptr ? FloatVec::loadu(in.grad_kl + i) : weight;
      FloatVec g_mu, g_lv;
      latent_grads(has_grad_z, in.has_kl, g_z, eps, w, load_widened(in.mu + i), load_widened(in.logvar + i), g_mu,
                   g_lv);
      store_narrowed(grad_mu + i, g_mu);
      store_narrowed(grad_logvar + i, g_lv);
    }
  }
  for (; i < end; ++i) {
    const acc g_z = has_grad_z ? static_cast<acc>(in.grad_z[i]) : acc(0);
    const acc eps = has_grad_z ? static_cast<acc>(in.noise[i]) : acc(0);
    const acc w = in.grad_kl != nullptr ? in.grad_kl[i] : in.kl_weight;
    acc g_mu, g_lv;
    latent_grads<acc>(has_grad_z, in.has_kl, g_z, eps, w, static_cast<acc>(in.mu[i]), static_cast<acc>(in.logvar[i]),
                      g_mu, g_lv);
    grad_mu[i] = static_cast<scalar_t>(g_mu);
    grad_logvar[i] = static_cast<scalar_t>(g_lv);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastvae::cpu
