#include "vae_loss.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace fastvae {

Recon parse_recon(std::string_view recon) {
  if (recon == "mse") return Recon::Mse;
  if (recon == "l1") return Recon::L1;
  if (recon == "bce") return Recon::Bce;
  TORCH_CHECK(recon == "bce_logits", "recon must be one of 'mse', 'l1', 'bce', 'bce_logits', got '", recon, "'");
  return Recon::BceLogits;
}

namespace {

VaeLossReductions parse_reductions(std::string_view recon_reduction, std::string_view kl_reduction) {
  return {parse_reduction(recon_reduction, /*allow_none=*/false), parse_reduction(kl_reduction, /*allow_none=*/false)};
}

}  // namespace

VaeLossReductions check_vae_loss_inputs(const at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& mu,
                                        const at::Tensor& logvar, std::string_view recon_reduction,
                                        std::string_view kl_reduction) {
  check_pair("x_hat", x_hat, "x", x);
  check_pair("mu", mu, "logvar", logvar);
  TORCH_CHECK(x.dim() > 0 && mu.dim() > 0, "x and mu need a batch dimension, got x of shape ",
              x.sizes(), " and mu of shape ", mu.sizes());
  TORCH_CHECK(x.size(0) == mu.size(0), "x has batch size ", x.size(0), " but mu has ", mu.size(0));
  TORCH_CHECK(x.device() == mu.device(), "x is on ", x.device(), " but mu is on ", mu.device());
  return parse_reductions(recon_reduction, kl_reduction);
}

VaeLossReductions check_vae_loss_backward_inputs(const IncomingGrad& grad_loss, const IncomingGrad& grad_recon,
                                                 const IncomingGrad& grad_kl, const at::Tensor& image_grad,
                                                 const at::Tensor& mu, const at::Tensor& logvar,
                                                 std::string_view recon_reduction, std::string_view kl_reduction) {
  check_pair("mu", mu, "logvar", logvar);
  check_float("image_grad", image_grad);
  TORCH_CHECK(image_grad.device() == mu.device(), "image_grad is on ", image_grad.device(), " but mu is on ",
              mu.device());
  TORCH_CHECK(mu.dim() > 0, "mu needs a batch dimension, got shape ", mu.sizes());
  // Empty when the forward wrote no image gradient, and then only the latents' can be asked for.
  TORCH_CHECK(image_grad.numel() == 0 || (image_grad.dim() > 0 && image_grad.size(0) == mu.size(0)),
              "image_grad has shape ", image_grad.sizes(), " but mu has ", mu.sizes(),
              "; it must be the gradient of a batch of the same size (or empty)");
  const auto acc = accumulate_type(image_grad.scalar_type());
  const auto check = [&](const char* name, const IncomingGrad& incoming) {
    if (!incoming.has_value() || !incoming->defined()) return;
    const at::Tensor& grad = *incoming;
    TORCH_CHECK(grad.dim() == 0, name, " must be 0-dimensional, got shape ", grad.sizes());
    TORCH_CHECK(grad.scalar_type() == acc, name, " is ", grad.scalar_type(), " but the output it is the gradient of is ",
                acc);
    TORCH_CHECK(grad.device() == mu.device(), name, " is on ", grad.device(), " but the inputs are on ", mu.device());
  };
  check("grad_loss", grad_loss);
  check("grad_recon", grad_recon);
  check("grad_kl", grad_kl);
  return parse_reductions(recon_reduction, kl_reduction);
}

VaeLossReductions check_vae_loss_backward_inplace_inputs(const IncomingGrad& grad_loss, const IncomingGrad& grad_recon,
                                                         const IncomingGrad& grad_kl, const at::Tensor& image_grad,
                                                         const at::Tensor& mu, const at::Tensor& logvar,
                                                         std::string_view recon_reduction,
                                                         std::string_view kl_reduction) {
  const VaeLossReductions parsed = check_vae_loss_backward_inputs(grad_loss, grad_recon, grad_kl, image_grad, mu,
                                                                  logvar, recon_reduction, kl_reduction);
  TORCH_CHECK(image_grad.is_contiguous(), "vae_loss_backward_ scales image_grad in place, so it must be contiguous, "
              "got strides ", image_grad.strides(), " for shape ", image_grad.sizes());
  return parsed;
}

bool check_target_grad_input(Recon recon, bool compute_grad_x, const std::optional<at::Tensor>& x_hat,
                             const at::Tensor& image_grad) {
  if (!compute_grad_x || recon_grad_target_is_negated(recon)) return false;
  TORCH_CHECK(x_hat.has_value(), "the gradient of x for a BCE reconstruction term is a function of x_hat, "
              "which must be given");
  check_pair("x_hat", *x_hat, "image_grad", image_grad);
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_vae_loss_outputs(const at::Tensor& x,
                                                                                  bool compute_image_grad) {
  const auto options = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor image_grad = compute_image_grad ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  return {at::empty({}, options), at::empty({}, options), at::empty({}, options), image_grad};
}

std::tuple<at::Tensor, at::Tensor> empty_latent_grads(const at::Tensor& mu) {
  return {at::empty(mu.sizes(), mu.options()), at::empty(mu.sizes(), mu.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_vae_loss_backward_outputs(
    const at::Tensor& image_grad, const at::Tensor& mu, bool scale_image, bool compute_grad_x) {
  const auto like_image = [&](bool needed) {
    return needed ? at::empty(image_grad.sizes(), image_grad.options()) : at::empty({0}, image_grad.options());
  };
  auto [grad_mu, grad_logvar] = empty_latent_grads(mu);
  return {like_image(scale_image), like_image(compute_grad_x), grad_mu, grad_logvar};
}

}  // namespace fastvae
