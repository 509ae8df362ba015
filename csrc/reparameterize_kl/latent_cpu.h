// The latent loops on CPU, in the build the CPU can run (baseline or AVX2): reparameterize_kl's,
// and vae_loss's KL term, which is the same loop without z.
#pragma once

#include "../cpu_utils.h"
#include "reparameterize_kl_cpu_kernels.h"

namespace fastvae::cpu {

// z and its eps (where not null) and the KL of [begin, end), as sample_forward. noise comes last,
// defaulted, as only sampling for a backward wants it.
template <typename scalar_t>
acc_t<scalar_t> latent_forward(const scalar_t* mu, const scalar_t* logvar, uint64_t seed, scalar_t* z,
                               acc_t<scalar_t>* kl, KlOutput kl_output, int64_t begin, int64_t end,
                               float* noise = nullptr) {
#if FASTVAE_AVX2_BUILD
  if (use_avx2()) return sample_forward_avx2(mu, logvar, seed, z, noise, kl, kl_output, begin, end);
#endif
  return sample_forward(mu, logvar, seed, z, noise, kl, kl_output, begin, end);
}

// grad_mu and grad_logvar of [begin, end), as sample_backward.
template <typename scalar_t>
void latent_backward(const LatentGradInputs<scalar_t>& in, scalar_t* grad_mu, scalar_t* grad_logvar, int64_t begin,
                     int64_t end) {
#if FASTVAE_AVX2_BUILD
  if (use_avx2()) return sample_backward_avx2(in, grad_mu, grad_logvar, begin, end);
#endif
  sample_backward(in, grad_mu, grad_logvar, begin, end);
}

}  // namespace fastvae::cpu
