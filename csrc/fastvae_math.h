// The per-element math of fastvae, written once for g++ (CPU kernels, C++ tests) and nvcc (CUDA
// kernels). The Triton kernels mirror these functions and name them in comments.
//
// Everything here is a pure function of its arguments: no tensors, no ATen, so the C++ unit
// tests can check it against known answers and finite differences without a Python runtime.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTVAE_HD __host__ __device__ __forceinline__
#else
#define FASTVAE_HD inline
#endif

namespace fastvae {

// ---------------------------------------------------------------------------------------------
// The elementwise primitives the templates below are written with. float and double take the C
// library's functions; a vector type (at::vec::Vectorized, in the vectorized CPU loops) takes the
// generic templates, which call its own member functions. The non-template overloads are exact
// matches, so scalars never reach the templates.

FASTVAE_HD float exp_(float v) { return expf(v); }
FASTVAE_HD double exp_(double v) { return exp(v); }
FASTVAE_HD float log_(float v) { return logf(v); }
FASTVAE_HD float cos_(float v) { return cosf(v); }
FASTVAE_HD float sqrt_(float v) { return sqrtf(v); }
FASTVAE_HD float max_(float a, float b) { return a > b ? a : b; }

#if !defined(__CUDACC__)
template <typename V>
inline V exp_(const V& v) { return v.exp(); }
template <typename V>
inline V log_(const V& v) { return v.log(); }
template <typename V>
inline V cos_(const V& v) { return v.cos(); }
template <typename V>
inline V sqrt_(const V& v) { return v.sqrt(); }
template <typename V>
inline V max_(const V& a, const V& b) { return maximum(a, b); }  // at::vec::maximum, found by ADL
#endif

// ---------------------------------------------------------------------------------------------
// Reconstruction terms of vae_loss: the per-element negative log-likelihood of x given the
// decoder's output x_hat, as torch's losses define it, and its derivatives. Templated on T so the
// CPU kernel runs the same expressions on at::vec::Vectorized lanes as on scalars.

enum class Recon {
  Mse,        // (x_hat - x)^2: F.mse_loss
  L1,         // |x_hat - x|: F.l1_loss
  Bce,        // x_hat a probability: F.binary_cross_entropy
  BceLogits,  // x_hat a logit: F.binary_cross_entropy_with_logits
};

// The primitives the terms need beyond those above, for scalars and (outside nvcc) vectors.
FASTVAE_HD double log_(double v) { return log(v); }
FASTVAE_HD float log1p_(float v) { return log1pf(v); }
FASTVAE_HD double log1p_(double v) { return log1p(v); }
FASTVAE_HD float abs_(float v) { return fabsf(v); }
FASTVAE_HD double abs_(double v) { return fabs(v); }
// max(v, lo) that keeps a NaN v, as std::max(v, lo) in torch's kernels and at::vec::maximum do.
FASTVAE_HD float clamp_min_(float v, float lo) { return v < lo ? lo : v; }
FASTVAE_HD double clamp_min_(double v, double lo) { return v < lo ? lo : v; }
// torch.sign: sign(0) = 0, the subgradient torch's l1_loss takes at a tie.
FASTVAE_HD float sign_(float v) { return static_cast<float>(v > 0.0f) - static_cast<float>(v < 0.0f); }
FASTVAE_HD double sign_(double v) { return static_cast<double>(v > 0.0) - static_cast<double>(v < 0.0); }

#if !defined(__CUDACC__)
template <typename V>
inline V log1p_(const V& v) { return v.log1p(); }
template <typename V>
inline V abs_(const V& v) { return v.abs(); }
template <typename V>
inline V clamp_min_(const V& v, const V& lo) { return maximum(v, lo); }
template <typename V>
inline V sign_(const V& v) { return v.gt(V(0)) - v.lt(V(0)); }  // 1 or 0 per comparison
#endif

// F.binary_cross_entropy clamps each log at -100, so probabilities of exactly 0 or 1 give a
// finite loss, and divides its gradient by max(x_hat (1 - x_hat), 1e-12).
constexpr double kBceLogFloor = -100.0;
constexpr double kBceGradEpsilon = 1e-12;

// The logs and the exp of the BCE terms: log(v) clamped as torch's, exp(v) for v <= 0, and
// log1p(e) for e in [0, 1]. Apart from log_, exp_ and log1p_ so that the AVX2 CPU loops can
// specialize them for float lanes (cpu_vec_math.h) and no other caller.
template <typename T>
FASTVAE_HD T bce_clamped_log_(T v) {
  return clamp_min_(log_(v), T(kBceLogFloor));
}
template <typename T>
FASTVAE_HD T bce_exp_(T v) {
  return exp_(v);
}
template <typename T>
FASTVAE_HD T bce_log1p_(T e) {
  return log1p_(e);
}

// a where v >= 0, else b (b at a NaN v).
FASTVAE_HD float where_nonnegative_(float v, float a, float b) { return v >= 0.0f ? a : b; }
FASTVAE_HD double where_nonnegative_(double v, double a, double b) { return v >= 0.0 ? a : b; }
#if !defined(__CUDACC__)
template <typename V>
inline V where_nonnegative_(const V& v, const V& a, const V& b) { return V::blendv(b, a, v >= V(0)); }
#endif

// A logit's term and gradient are both taken from e = exp(-|l|), in (0, 1]: no exp of a large
// positive number, so huge logits of either sign stay finite, and one exp serves both.
template <typename T>
FASTVAE_HD T logit_exp_(T l) {
  return bce_exp_(T(0) - abs_(l));
}
// torch's (1 - x) l - log_sigmoid(l), with log_sigmoid(l) = min(l, 0) - log1p(exp(-|l|)).
template <typename T>
FASTVAE_HD T logit_term_(T l, T x, T e) {
  return (T(1) - x) * l + clamp_min_(T(0) - l, T(0)) + bce_log1p_(e);
}
// weight (sigmoid(l) - x), with sigmoid(l) = 1 / (1 + e) for l >= 0 and e / (1 + e) below.
template <typename T>
FASTVAE_HD T logit_grad_(T l, T x, T e, T weight) {
  return (where_nonnegative_(l, T(1), e) / (T(1) + e) - x) * weight;
}

template <Recon kRecon, typename T>
FASTVAE_HD T recon_term(T x_hat, T x) {
  if constexpr (kRecon == Recon::Mse) {
    const T d = x_hat - x;
    return d * d;
  } else if constexpr (kRecon == Recon::L1) {
    return abs_(x_hat - x);
  } else if constexpr (kRecon == Recon::Bce) {
    return T(0) - (x * bce_clamped_log_(x_hat) + (T(1) - x) * bce_clamped_log_(T(1) - x_hat));
  } else {
    return logit_term_(x_hat, x, logit_exp_(x_hat));
  }
}

// weight * d recon_term / d x_hat.
template <Recon kRecon, typename T>
FASTVAE_HD T recon_grad(T x_hat, T x, T weight) {
  if constexpr (kRecon == Recon::Mse) {
    return (x_hat - x) * (T(2) * weight);
  } else if constexpr (kRecon == Recon::L1) {
    return sign_(x_hat - x) * weight;
  } else if constexpr (kRecon == Recon::Bce) {
    return (x_hat - x) / clamp_min_((T(1) - x_hat) * x_hat, T(kBceGradEpsilon)) * weight;
  } else {
    return logit_grad_(x_hat, x, logit_exp_(x_hat), weight);
  }
}

template <typename T>
struct TermAndGrad {
  T term, grad;
};

// recon_term and recon_grad together, computing once what both need (a logit's exp).
template <Recon kRecon, typename T>
FASTVAE_HD TermAndGrad<T> recon_term_and_grad(T x_hat, T x, T weight) {
  if constexpr (kRecon == Recon::BceLogits) {
    const T e = logit_exp_(x_hat);
    return {logit_term_(x_hat, x, e), logit_grad_(x_hat, x, e, weight)};
  } else {
    return {recon_term<kRecon>(x_hat, x), recon_grad<kRecon>(x_hat, x, weight)};
  }
}

// Whether d recon_term / d x is -d recon_term / d x_hat (the squared and absolute errors), so the
// backward negates the image gradient, rather than a function of x_hat alone (recon_grad_target).
FASTVAE_HD constexpr bool recon_grad_target_is_negated(Recon recon) {
  return recon == Recon::Mse || recon == Recon::L1;
}

// d recon_term / d x for the BCE forms, as torch's target gradients: log1p(-p) - log(p) for a
// probability (unclamped, so infinite at 0 and 1, as torch's), -l for a logit.
template <Recon kRecon, typename T>
FASTVAE_HD T recon_grad_target(T x_hat) {
  static_assert(!recon_grad_target_is_negated(kRecon), "the target gradient is the negated image gradient");
  if constexpr (kRecon == Recon::Bce) {
    return log1p_(T(0) - x_hat) - log_(x_hat);
  } else {
    return T(0) - x_hat;
  }
}

// ---------------------------------------------------------------------------------------------
// KL(N(mu, exp(logvar)) || N(0, 1)) per latent, and its gradients.

template <typename T>
FASTVAE_HD T kl_term(T mu, T logvar) {
  return T(-0.5) * (T(1) + logvar - mu * mu - exp_(logvar));
}

template <typename T>
FASTVAE_HD T kl_grad_mu(T mu) {
  return mu;
}

template <typename T>
FASTVAE_HD T kl_grad_logvar(T logvar) {
  return T(0.5) * (exp_(logvar) - T(1));
}

// ---------------------------------------------------------------------------------------------
// Reparameterization z = mu + exp(0.5 * logvar) * eps and what its backward needs.

template <typename T>
FASTVAE_HD T reparameterize(T mu, T logvar, T eps) {
  return mu + exp_(T(0.5) * logvar) * eps;
}

// dz/dlogvar; dz/dmu is 1. Both backends take it from eps itself (the CPU one saved, the Triton
// one drawn again), never from z - mu: z's rounding would swamp std * eps wherever std is small
// next to mu (logvar -30 in diffusers' clamp range) or the dtype is narrow.
template <typename T>
FASTVAE_HD T reparameterize_grad_logvar(T logvar, T eps) {
  return T(0.5) * exp_(T(0.5) * logvar) * eps;
}

// ---------------------------------------------------------------------------------------------
// Noise: exactly Triton's tl.randn(seed, offset) (triton/language/random.py), so one seed gives
// the same eps from the C++ CPU kernel and from the Triton kernel.

struct Philox4x32 {
  uint32_t c0, c1, c2, c3;
};

FASTVAE_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox-4x32-10 (Salmon et al., SC'11), round for round as triton's philox_impl, on the four
// counter words in place. U is uint32_t, or a vector of uint32 lanes that provides
// mulhi32(uint32_t, U), uint32_t * U, U ^ U and U ^ uint32_t (the AVX2 CPU loop's U32x8).
template <typename U>
FASTVAE_HD void philox4x32_10_inplace(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  for (int round = 0; round < 10; ++round) {
    const U a0 = c0, a2 = c2;
    c0 = mulhi32(kRoundB, a2) ^ c1 ^ k0;
    c2 = mulhi32(kRoundA, a0) ^ c3 ^ k1;
    c1 = kRoundB * a2;
    c3 = kRoundA * a0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

FASTVAE_HD Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  philox4x32_10_inplace(ctr.c0, ctr.c1, ctr.c2, ctr.c3, k0, k1);
  return ctr;
}

// 1 / 2**31 as Triton writes it, which maps a non-negative int32 into [0, 1).
constexpr float kUniformScale = 4.6566127342e-10f;

// triton's uint_to_uniform_float for 32-bit inputs: a float in [0, 1). The int32 is rounded to
// float first, then scaled, as Triton does.
FASTVAE_HD float uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

// triton's pair_uniform_to_normal (Box-Muller), first output only, all in float32 (T is float
// or a vector of floats).
template <typename T>
FASTVAE_HD T uniform_pair_to_normal(T u1, T u2) {
  u1 = max_(u1, T(1.0e-7f));
  const T theta = T(6.283185307179586f) * u2;
  return sqrt_(T(-2.0f) * log_(u1)) * cos_(theta);
}

// The two uniforms behind tl.randn(seed, index), for the element with logical row-major index
// `index`: key = the seed's two 32-bit halves, counter = (index_lo, index_hi, 0, 0), as Triton
// does with an int64 index.
struct UniformPair {
  float u1, u2;
};

FASTVAE_HD UniformPair philox_uniform_pair(uint64_t seed, uint64_t index) {
  const Philox4x32 r = philox4x32_10(
      Philox4x32{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return {uint_to_uniform(r.c0), uint_to_uniform(r.c1)};
}

// eps for the element with logical row-major index `index`: tl.randn(seed, index).
FASTVAE_HD float philox_normal(uint64_t seed, uint64_t index) {
  const UniformPair u = philox_uniform_pair(seed, index);
  return uniform_pair_to_normal<float>(u.u1, u.u2);
}

}  // namespace fastvae
