// fastvae::vae_loss on CPU: one parallel pass over the image pair and the latents.
//
// Where the image gradient is computed. Measured here on the image part alone (x 128x3x64x64
// float32, the same loops in the baseline build, medians of 80, 1 / 2 threads):
//   A. recompute it in the backward: fwd reads 2N; bwd reads 2N, writes N        1.43 / 0.74 ms
//   B. write it in the forward, scale it in the backward: 2N+N, then N+N          1.50 / 0.78 ms
//   C. write it in the forward, use it as is when its incoming weight is 1        0.75 / 0.38 ms
// C is kept: the forward writes d loss / d x_hat from the loads of the sum, and the backward
// scales it only when the weight (grad_loss + grad_recon) is not 1; for `loss.backward()` it is
// 1, and the image needs no backward pass at all. The price is one image-sized tensor held from the
// forward to the backward, where the decoder's activations are held anyway, and only when a
// gradient can be needed. Where nothing else reads image_grad (see vae_loss_autograd.cpp) the
// backward scales it in place, skipping the image when the weight is 1, and it becomes
// grad_x_hat; elsewhere the backward scales it into a new tensor, as B.
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../cpu_utils.h"
#include "../fastvae_math.h"
#include "../reparameterize_kl/latent_cpu.h"
#include "vae_loss.h"
#include "vae_loss_cpu_kernels.h"

namespace fastvae {
namespace {

using cpu::acc_t;
using cpu::kChunk;

// The baseline or the AVX2 build of the image loops (vae_loss_cpu_kernels.h).
template <Recon kRecon, bool kWriteGrad, typename scalar_t>
acc_t<scalar_t> recon_chunk(const scalar_t* x_hat, const scalar_t* x, acc_t<scalar_t> grad_weight,
                            scalar_t* image_grad, int64_t begin, int64_t end) {
#if FASTVAE_AVX2_BUILD
  if (cpu::use_avx2()) return cpu::recon_sum_avx2<kRecon, kWriteGrad>(x_hat, x, grad_weight, image_grad, begin, end);
#endif
  return cpu::recon_sum<kRecon, kWriteGrad>(x_hat, x, grad_weight, image_grad, begin, end);
}

template <typename scalar_t>
void scale_image_grad_chunk(const scalar_t* image_grad, acc_t<scalar_t> weight, scalar_t* grad_x_hat,
                            scalar_t* grad_x, int64_t begin, int64_t end) {
#if FASTVAE_AVX2_BUILD
  if (cpu::use_avx2()) return cpu::scale_image_grad_avx2(image_grad, weight, grad_x_hat, grad_x, begin, end);
#endif
  cpu::scale_image_grad(image_grad, weight, grad_x_hat, grad_x, begin, end);
}

template <Recon kRecon, typename scalar_t>
void target_grad_chunk(const scalar_t* x_hat, acc_t<scalar_t> weight, scalar_t* grad_x, int64_t begin, int64_t end) {
#if FASTVAE_AVX2_BUILD
  if (cpu::use_avx2()) return cpu::target_grad_avx2<kRecon>(x_hat, weight, grad_x, begin, end);
#endif
  cpu::target_grad<kRecon>(x_hat, weight, grad_x, begin, end);
}

// Nested dispatch: the image pair and the latents may differ in dtype, and each term
// accumulates in its own inputs' accumulate type, as in fastvae.reference.
#define FASTVAE_DISPATCH_IMAGE_LATENT(image, latent, name, ...)                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image, name, [&] {    \
    using image_t = scalar_t;                                                       \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, latent, name, [&] { \
      using latent_t = scalar_t;                                                    \
      __VA_ARGS__();                                                                \
    });                                                                             \
  })

// Chunks [0, image_chunks) cover the image tensors and the rest the latents, in one parallel region.
template <typename F>
void for_each_chunk(int64_t n_image, int64_t n_latent, const F& run) {
  const int64_t image_chunks = cpu::num_chunks(n_image);
  at::parallel_for(0, image_chunks + cpu::num_chunks(n_latent), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      if (c < image_chunks) {
        run(/*is_image=*/true, c, c * kChunk, cpu::chunk_end(c, n_image));
      } else {
        const int64_t l = c - image_chunks;
        run(/*is_image=*/false, l, l * kChunk, cpu::chunk_end(l, n_latent));
      }
    }
  });
}

template <Recon kRecon, typename image_t, typename latent_t>
void vae_loss_forward(const image_t* x_hat, const image_t* x, int64_t n_image, const latent_t* mu,
                      const latent_t* logvar, int64_t n_latent, double beta, double image_divisor,
                      double latent_divisor, acc_t<image_t>* loss, acc_t<image_t>* recon, acc_t<image_t>* kl,
                      image_t* image_grad) {
  using image_acc = acc_t<image_t>;
  using latent_acc = acc_t<latent_t>;
  const image_acc inverse_divisor = image_acc(1) / static_cast<image_acc>(image_divisor);
  const image_acc grad_weight =
      image_grad_includes_divisor(c10::CppTypeToScalarType<image_t>::value) ? inverse_divisor : image_acc(1);
  std::vector<image_acc> recon_partials(cpu::num_chunks(n_image));
  std::vector<latent_acc> kl_partials(cpu::num_chunks(n_latent));
  for_each_chunk(n_image, n_latent, [&](bool is_image, int64_t chunk, int64_t begin, int64_t end) {
    if (!is_image) {
      kl_partials[chunk] = cpu::latent_forward<latent_t>(mu, logvar, /*seed=*/0, /*z=*/nullptr, /*kl=*/nullptr,
                                                         cpu::KlOutput::Sum, begin, end);
    } else if (image_grad != nullptr) {
      recon_partials[chunk] = recon_chunk<kRecon, true>(x_hat, x, grad_weight, image_grad, begin, end);
    } else {
      recon_partials[chunk] = recon_chunk<kRecon, false>(x_hat, x, grad_weight, image_grad, begin, end);
    }
  });
  // Divisions rather than reciprocal products, as the reference divides; 0/0 gives nan for the
  // mean of nothing, as torch does.
  *recon = cpu::ordered_sum(recon_partials) / static_cast<image_acc>(image_divisor);
  *kl = static_cast<image_acc>(cpu::ordered_sum(kl_partials) / static_cast<latent_acc>(latent_divisor));
  *loss = *recon + static_cast<image_acc>(beta) * *kl;
}

// Weights of the incoming gradients: the image term appears in loss and recon, the KL term in
// loss (times beta) and kl; image_scale is what the forward left out of image_grad. grad_x_hat may
// be image_grad itself (vae_loss_backward_, which also sets skip_unit_weight). grad_x is the
// negated image gradient for kTarget = Mse, recon_grad_target<kTarget>(x_hat) otherwise.
template <Recon kTarget, typename image_t, typename latent_t>
void vae_loss_backward(const image_t* image_grad, const image_t* x_hat, int64_t n_image, double image_divisor,
                       bool skip_unit_weight, const latent_t* mu, const latent_t* logvar, int64_t n_latent,
                       acc_t<image_t> g_loss, acc_t<image_t> g_recon, acc_t<image_t> g_kl, double beta,
                       double latent_divisor, image_t* grad_x_hat, image_t* grad_x, latent_t* grad_mu,
                       latent_t* grad_logvar) {
  using image_acc = acc_t<image_t>;
  using latent_acc = acc_t<latent_t>;
  const image_acc inverse_divisor = image_acc(1) / static_cast<image_acc>(image_divisor);
  const image_acc image_scale =
      image_grad_includes_divisor(c10::CppTypeToScalarType<image_t>::value) ? image_acc(1) : inverse_divisor;
  const image_acc image_weight = (g_loss + g_recon) * image_scale;
  // In place, a weight of 1 (loss.backward()) leaves the image gradient as it is: no pass over
  // the image at all.
  if (skip_unit_weight && image_weight == image_acc(1)) n_image = 0;
  const latent_acc latent_weight =
      static_cast<latent_acc>(static_cast<image_acc>(beta) * g_loss + g_kl) / static_cast<latent_acc>(latent_divisor);
  // The KL's gradient is reparameterize_kl's without z.
  const cpu::LatentGradInputs<latent_t> latent{nullptr, nullptr, nullptr, /*has_kl=*/true, latent_weight, mu, logvar};
  for_each_chunk(n_image, n_latent, [&](bool is_image, int64_t, int64_t begin, int64_t end) {
    if (!is_image) {
      cpu::latent_backward(latent, grad_mu, grad_logvar, begin, end);
    } else if constexpr (recon_grad_target_is_negated(kTarget)) {
      scale_image_grad_chunk(image_grad, image_weight, grad_x_hat, grad_x, begin, end);
    } else {
      if (grad_x_hat != nullptr) {
        scale_image_grad_chunk<image_t>(image_grad, image_weight, grad_x_hat, nullptr, begin, end);
      }
      if (grad_x != nullptr) {
        target_grad_chunk<kTarget>(x_hat, (g_loss + g_recon) * inverse_divisor, grad_x, begin, end);
      }
    }
  });
}

// Calls f with the Recon that vae_loss_backward takes as kTarget: Mse stands for every form whose
// x gradient is the negated image gradient.
template <typename F>
void dispatch_target(Recon recon, bool needs_x_hat, const F& f) {
  dispatch_recon(needs_x_hat ? recon : Recon::Mse, [&](auto target) {
    constexpr Recon kTarget = decltype(target)::value;
    if constexpr (kTarget == Recon::Mse || !recon_grad_target_is_negated(kTarget)) f(target);
  });
}

void check_cpu(const at::Tensor& image, const at::Tensor& mu) {
  TORCH_CHECK(image.device().is_cpu() && mu.device().is_cpu(), "the CPU kernel of fastvae::vae_loss got tensors on ",
              image.device(), " and ", mu.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_cpu(
    const at::Tensor& x_hat_in, const at::Tensor& x_in, const at::Tensor& mu_in, const at::Tensor& logvar_in,
    double beta, c10::string_view recon_name, c10::string_view recon_reduction, c10::string_view kl_reduction,
    bool compute_image_grad) {
  const VaeLossReductions reductions =
      check_vae_loss_inputs(x_hat_in, x_in, mu_in, logvar_in, recon_reduction, kl_reduction);
  const Recon recon_form = parse_recon(recon_name);
  check_cpu(x_in, mu_in);
  const at::Tensor x_hat = x_hat_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  auto [loss, recon, kl, image_grad] = empty_vae_loss_outputs(x, compute_image_grad);
  FASTVAE_DISPATCH_IMAGE_LATENT(x.scalar_type(), mu.scalar_type(), "vae_loss_cpu", [&] {
    using image_acc = acc_t<image_t>;
    dispatch_recon(recon_form, [&](auto form) {
      vae_loss_forward<decltype(form)::value>(x_hat.const_data_ptr<image_t>(), x.const_data_ptr<image_t>(), x.numel(),
                                   mu.const_data_ptr<latent_t>(), logvar.const_data_ptr<latent_t>(), mu.numel(), beta,
                                   reduction_divisor(reductions.recon, x), reduction_divisor(reductions.kl, mu),
                                   loss.mutable_data_ptr<image_acc>(), recon.mutable_data_ptr<image_acc>(),
                                   kl.mutable_data_ptr<image_acc>(),
                                   compute_image_grad ? image_grad.mutable_data_ptr<image_t>() : nullptr);
    });
  });
  return {loss, recon, kl, image_grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_backward_cpu(
    const IncomingGrad& grad_loss, const IncomingGrad& grad_recon, const IncomingGrad& grad_kl,
    const at::Tensor& image_grad_in, const std::optional<at::Tensor>& x_hat_in, const at::Tensor& mu_in,
    const at::Tensor& logvar_in, double beta, c10::string_view recon_name, c10::string_view recon_reduction,
    c10::string_view kl_reduction, bool scale_image, bool compute_grad_x) {
  const VaeLossReductions reductions = check_vae_loss_backward_inputs(grad_loss, grad_recon, grad_kl, image_grad_in,
                                                                     mu_in, logvar_in, recon_reduction, kl_reduction);
  const Recon recon_form = parse_recon(recon_name);
  const bool needs_x_hat = check_target_grad_input(recon_form, compute_grad_x, x_hat_in, image_grad_in);
  check_cpu(image_grad_in, mu_in);
  const at::Tensor image_grad = image_grad_in.contiguous();
  const at::Tensor x_hat = needs_x_hat ? x_hat_in->contiguous() : at::Tensor();
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  auto [grad_x_hat, grad_x, grad_mu, grad_logvar] =
      empty_vae_loss_backward_outputs(image_grad, mu, scale_image, compute_grad_x);
  FASTVAE_DISPATCH_IMAGE_LATENT(image_grad.scalar_type(), mu.scalar_type(), "vae_loss_backward_cpu", [&] {
    using image_acc = acc_t<image_t>;
    dispatch_target(recon_form, needs_x_hat, [&](auto target) {
      vae_loss_backward<decltype(target)::value, image_t, latent_t>(
          image_grad.const_data_ptr<image_t>(), needs_x_hat ? x_hat.const_data_ptr<image_t>() : nullptr,
          scale_image || compute_grad_x ? image_grad.numel() : 0, reduction_divisor(reductions.recon, image_grad),
          /*skip_unit_weight=*/false, mu.const_data_ptr<latent_t>(), logvar.const_data_ptr<latent_t>(), mu.numel(),
          incoming_grad_value<image_acc>(grad_loss), incoming_grad_value<image_acc>(grad_recon),
          incoming_grad_value<image_acc>(grad_kl), beta, reduction_divisor(reductions.kl, mu),
          scale_image ? grad_x_hat.mutable_data_ptr<image_t>() : nullptr,
          compute_grad_x ? grad_x.mutable_data_ptr<image_t>() : nullptr, grad_mu.mutable_data_ptr<latent_t>(),
          grad_logvar.mutable_data_ptr<latent_t>());
    });
  });
  return {grad_x_hat, grad_x, grad_mu, grad_logvar};
}

std::tuple<at::Tensor, at::Tensor> vae_loss_backward_inplace_cpu(
    const IncomingGrad& grad_loss, const IncomingGrad& grad_recon, const IncomingGrad& grad_kl, at::Tensor& image_grad,
    const at::Tensor& mu_in, const at::Tensor& logvar_in, double beta, c10::string_view recon_reduction,
    c10::string_view kl_reduction) {
  const VaeLossReductions reductions = check_vae_loss_backward_inplace_inputs(
      grad_loss, grad_recon, grad_kl, image_grad, mu_in, logvar_in, recon_reduction, kl_reduction);
  check_cpu(image_grad, mu_in);
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  auto [grad_mu, grad_logvar] = empty_latent_grads(mu);
  FASTVAE_DISPATCH_IMAGE_LATENT(image_grad.scalar_type(), mu.scalar_type(), "vae_loss_backward_inplace_cpu", [&] {
    using image_acc = acc_t<image_t>;
    image_t* data = image_grad.mutable_data_ptr<image_t>();
    vae_loss_backward<Recon::Mse, image_t, latent_t>(
        data, /*x_hat=*/nullptr, image_grad.numel(), reduction_divisor(reductions.recon, image_grad),
        /*skip_unit_weight=*/true, mu.const_data_ptr<latent_t>(), logvar.const_data_ptr<latent_t>(), mu.numel(),
        incoming_grad_value<image_acc>(grad_loss), incoming_grad_value<image_acc>(grad_recon),
        incoming_grad_value<image_acc>(grad_kl), beta, reduction_divisor(reductions.kl, mu), /*grad_x_hat=*/data,
        /*grad_x=*/nullptr, grad_mu.mutable_data_ptr<latent_t>(), grad_logvar.mutable_data_ptr<latent_t>());
  });
  return {grad_mu, grad_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CPU, m) {
  m.impl("vae_loss", &vae_loss_cpu);
  m.impl("vae_loss_backward", &vae_loss_backward_cpu);
  m.impl("vae_loss_backward_", &vae_loss_backward_inplace_cpu);
}

}  // namespace fastvae
