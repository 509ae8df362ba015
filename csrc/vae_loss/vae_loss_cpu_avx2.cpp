// The AVX2 build of vae_loss_cpu_kernels.h, picked at run time by cpu::use_avx2().
#include "../avx2_target.h"

#if FASTVAE_AVX2_BUILD
#include "vae_loss_cpu_kernels.h"

namespace fastvae::cpu {

template <Recon kRecon, bool kWriteGrad, typename scalar_t>
acc_t<scalar_t> recon_sum_avx2(const scalar_t* x_hat, const scalar_t* x, acc_t<scalar_t> grad_weight,
                               scalar_t* image_grad, int64_t begin, int64_t end) {
  return AVX2::recon_sum<kRecon, kWriteGrad>(x_hat, x, grad_weight, image_grad, begin, end);
}

template <typename scalar_t>
void scale_image_grad_avx2(const scalar_t* image_grad, acc_t<scalar_t> weight, scalar_t* grad_x_hat,
                           scalar_t* grad_x, int64_t begin, int64_t end) {
  AVX2::scale_image_grad(image_grad, weight, grad_x_hat, grad_x, begin, end);
}

template <Recon kRecon, typename scalar_t>
void target_grad_avx2(const scalar_t* x_hat, acc_t<scalar_t> weight, scalar_t* grad_x, int64_t begin, int64_t end) {
  AVX2::target_grad<kRecon>(x_hat, weight, grad_x, begin, end);
}

#define FASTVAE_INSTANTIATE_RECON(recon, scalar_t)                                                       \
  template acc_t<scalar_t> recon_sum_avx2<recon, true>(const scalar_t*, const scalar_t*, acc_t<scalar_t>, \
                                                       scalar_t*, int64_t, int64_t);                     \
  template acc_t<scalar_t> recon_sum_avx2<recon, false>(const scalar_t*, const scalar_t*, acc_t<scalar_t>, \
                                                        scalar_t*, int64_t, int64_t);

#define FASTVAE_INSTANTIATE(scalar_t)                                                                          \
  FASTVAE_INSTANTIATE_RECON(Recon::Mse, scalar_t)                                                              \
  FASTVAE_INSTANTIATE_RECON(Recon::L1, scalar_t)                                                               \
  FASTVAE_INSTANTIATE_RECON(Recon::Bce, scalar_t)                                                              \
  FASTVAE_INSTANTIATE_RECON(Recon::BceLogits, scalar_t)                                                        \
  template void scale_image_grad_avx2(const scalar_t*, acc_t<scalar_t>, scalar_t*, scalar_t*, int64_t, int64_t); \
  template void target_grad_avx2<Recon::Bce>(const scalar_t*, acc_t<scalar_t>, scalar_t*, int64_t, int64_t);      \
  template void target_grad_avx2<Recon::BceLogits>(const scalar_t*, acc_t<scalar_t>, scalar_t*, int64_t, int64_t);

FASTVAE_INSTANTIATE(float)
FASTVAE_INSTANTIATE(double)
FASTVAE_INSTANTIATE(c10::Half)
FASTVAE_INSTANTIATE(c10::BFloat16)

}  // namespace fastvae::cpu
#endif
