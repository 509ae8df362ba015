// The AVX2 build of reparameterize_kl_cpu_kernels.h, picked at run time by cpu::use_avx2().
#include "../avx2_target.h"

#if FASTVAE_AVX2_BUILD
#include "reparameterize_kl_cpu_kernels.h"

namespace fastvae::cpu {

template <typename scalar_t>
acc_t<scalar_t> sample_forward_avx2(const scalar_t* mu, const scalar_t* logvar, uint64_t seed, scalar_t* z,
                                    float* noise, acc_t<scalar_t>* kl, KlOutput kl_output, int64_t begin,
                                    int64_t end) {
  return AVX2::sample_forward(mu, logvar, seed, z, noise, kl, kl_output, begin, end);
}

template <typename scalar_t>
void sample_backward_avx2(const LatentGradInputs<scalar_t>& in, scalar_t* grad_mu, scalar_t* grad_logvar,
                          int64_t begin, int64_t end) {
  AVX2::sample_backward(in, grad_mu, grad_logvar, begin, end);
}

#define FASTVAE_INSTANTIATE(scalar_t)                                                                           \
  template acc_t<scalar_t> sample_forward_avx2(const scalar_t*, const scalar_t*, uint64_t, scalar_t*, float*,   \
                                               acc_t<scalar_t>*, KlOutput, int64_t, int64_t);                   \
  template void sample_backward_avx2(const LatentGradInputs<scalar_t>&, scalar_t*, scalar_t*, int64_t, int64_t);

FASTVAE_INSTANTIATE(float)
FASTVAE_INSTANTIATE(double)
FASTVAE_INSTANTIATE(c10::Half)
FASTVAE_INSTANTIATE(c10::BFloat16)

}  // namespace fastvae::cpu
#endif
