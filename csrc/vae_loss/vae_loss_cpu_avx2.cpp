// The AVX2 build of vae_loss_cpu_kernels.h, picked at run time by cpu::use_avx2().
//
// setuptools compiles every source with the same flags, so instead of -mavx2 -mf16c this file
// switches the target with a pragma and defines the macros those flags would define, before
// torch's vector headers (and sleef.h) choose their AVX2 code by them. Not FMA: without it no
// multiply-add can be contracted, so this build rounds exactly like the baseline one.
// setup.py and CMakeLists.txt link this file last, so the inline functions of torch and of the
// standard library that it compiles for AVX2 lose to the baseline copies of earlier files.
#include "../cpu_utils.h"  // for FASTVAE_AVX2_BUILD; it includes no vector code

#if FASTVAE_AVX2_BUILD
#pragma GCC target("avx2,f16c")
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "vae_loss_cpu_kernels.h"

namespace fastvae::cpu {

template <bool kWriteGrad, typename scalar_t>
acc_t<scalar_t> squared_error_sum_avx2(const scalar_t* x_hat, const scalar_t* x, acc_t<scalar_t> factor,
                                       scalar_t* image_grad, int64_t begin, int64_t end) {
  return AVX2::squared_error_sum<kWriteGrad>(x_hat, x, factor, image_grad, begin, end);
}

template <typename scalar_t>
void scale_image_grad_avx2(const scalar_t* image_grad, acc_t<scalar_t> weight, scalar_t* grad_x_hat,
                           scalar_t* grad_x, int64_t begin, int64_t end) {
  AVX2::scale_image_grad(image_grad, weight, grad_x_hat, grad_x, begin, end);
}

#define FASTVAE_INSTANTIATE(scalar_t)                                                                    \
  template acc_t<scalar_t> squared_error_sum_avx2<true>(const scalar_t*, const scalar_t*, acc_t<scalar_t>, \
                                                        scalar_t*, int64_t, int64_t);                     \
  template acc_t<scalar_t> squared_error_sum_avx2<false>(const scalar_t*, const scalar_t*, acc_t<scalar_t>, \
                                                         scalar_t*, int64_t, int64_t);                    \
  template void scale_image_grad_avx2(const scalar_t*, acc_t<scalar_t>, scalar_t*, scalar_t*, int64_t, int64_t);

FASTVAE_INSTANTIATE(float)
FASTVAE_INSTANTIATE(double)
FASTVAE_INSTANTIATE(c10::Half)
FASTVAE_INSTANTIATE(c10::BFloat16)

}  // namespace fastvae::cpu
#endif
