// The vectorized image loops of vae_loss on CPU. This header is compiled twice: for the x86-64
// baseline by vae_loss_cpu.cpp and with AVX2 by vae_loss_cpu_avx2.cpp. As in ATen, each build
// lives in a namespace named by CPU_CAPABILITY (at::vec's Vectorized too), so the two builds
// never share a symbol.
#pragma once

#include "../cpu_vec.h"
#include "../cpu_vec_math.h"
#include "../fastvae_math.h"

namespace fastvae::cpu {

// The AVX2 build's entry points, defined in vae_loss_cpu_avx2.cpp for every Recon and dtype.
template <Recon kRecon, bool kWriteGrad, typename scalar_t>
acc_t<scalar_t> recon_sum_avx2(const scalar_t* x_hat, const scalar_t* x, acc_t<scalar_t> grad_weight,
                               scalar_t* image_grad, int64_t begin, int64_t end);
template <typename scalar_t>
void scale_image_grad_avx2(const scalar_t* image_grad, acc_t<scalar_t> weight, scalar_t* grad_x_hat,
                           scalar_t* grad_x, int64_t begin, int64_t end);
template <Recon kRecon, typename scalar_t>
void target_grad_avx2(const scalar_t* x_hat, acc_t<scalar_t> weight, scalar_t* grad_x, int64_t begin, int64_t end);

inline namespace CPU_CAPABILITY {

// Sum of recon_term<kRecon> over [begin, end), in a fixed order of lanes then tail; with
// kWriteGrad also image_grad = recon_grad<kRecon>(x_hat, x, grad_weight) from the same loads.
// Vectorized has 256 bits in both builds (an array, or an AVX2 register), so the lanes and their
// order are the same; the sums have the same bits where the term is adds and multiplies only
// (Mse, L1), and differ otherwise by the ulps of the C library's log and exp against, in the AVX2
// build, the fast logs and exp of cpu_vec_math.h (float32 lanes) or Sleef's (float64).
template <Recon kRecon, bool kWriteGrad, typename scalar_t>
acc_t<scalar_t> recon_sum(const scalar_t* x_hat, const scalar_t* x, acc_t<scalar_t> grad_weight,
                          scalar_t* image_grad, int64_t begin, int64_t end) {
  using Vec = AccVec<scalar_t>;
  const Vec w(grad_weight);
  // Two independent accumulators hide the add latency.
  Vec acc0(0), acc1(0);
  int64_t i = begin;
  for (; i + 2 * Vec::size() <= end; i += 2 * Vec::size()) {
    const Vec a0 = load_widened(x_hat + i), b0 = load_widened(x + i);
    const Vec a1 = load_widened(x_hat + i + Vec::size()), b1 = load_widened(x + i + Vec::size());
    if constexpr (kWriteGrad) {
      const TermAndGrad<Vec> r0 = recon_term_and_grad<kRecon>(a0, b0, w);
      const TermAndGrad<Vec> r1 = recon_term_and_grad<kRecon>(a1, b1, w);
      acc0 = acc0 + r0.term;
      acc1 = acc1 + r1.term;
      store_narrowed(image_grad + i, r0.grad);
      store_narrowed(image_grad + i + Vec::size(), r1.grad);
    } else {
      acc0 = acc0 + recon_term<kRecon>(a0, b0);
      acc1 = acc1 + recon_term<kRecon>(a1, b1);
    }
  }
  acc_t<scalar_t> total = lane_sum(acc0 + acc1);
  for (; i < end; ++i) {
    const acc_t<scalar_t> a = x_hat[i], b = x[i];
    if constexpr (kWriteGrad) {
      const TermAndGrad<acc_t<scalar_t>> r = recon_term_and_grad<kRecon>(a, b, grad_weight);
      total += r.term;
      image_grad[i] = static_cast<scalar_t>(r.grad);
    } else {
      total += recon_term<kRecon>(a, b);
    }
  }
  return total;
}

// grad_x_hat = weight * image_grad and grad_x = -weight * image_grad, each where not null.
template <typename scalar_t>
void scale_image_grad(const scalar_t* image_grad, acc_t<scalar_t> weight, scalar_t* grad_x_hat, scalar_t* grad_x,
                      int64_t begin, int64_t end) {
  using Vec = AccVec<scalar_t>;
  const Vec w(weight);
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    const Vec g = load_widened(image_grad + i) * w;
    if (grad_x_hat != nullptr) store_narrowed(grad_x_hat + i, g);
    if (grad_x != nullptr) store_narrowed(grad_x + i, g.neg());
  }
  for (; i < end; ++i) {
    const acc_t<scalar_t> g = static_cast<acc_t<scalar_t>>(image_grad[i]) * weight;
    if (grad_x_hat != nullptr) grad_x_hat[i] = static_cast<scalar_t>(g);
    if (grad_x != nullptr) grad_x[i] = static_cast<scalar_t>(-g);
  }
}

// grad_x = weight * recon_grad_target<kRecon>(x_hat), for the BCE forms.
template <Recon kRecon, typename scalar_t>
void target_grad(const scalar_t* x_hat, acc_t<scalar_t> weight, scalar_t* grad_x, int64_t begin, int64_t end) {
  using Vec = AccVec<scalar_t>;
  const Vec w(weight);
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    store_narrowed(grad_x + i, recon_grad_target<kRecon>(load_widened(x_hat + i)) * w);
  }
  for (; i < end; ++i) {
    grad_x[i] = static_cast<scalar_t>(recon_grad_target<kRecon>(static_cast<acc_t<scalar_t>>(x_hat[i])) * weight);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastvae::cpu
