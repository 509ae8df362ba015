// Autograd for fastvae::vae_loss, on every device. In C++ rather than torch.library's Python
// registration, which house style would suggest: on a 2-vCPU EPYC the Python node cost about
// 80 us a forward and 150 us a backward, as much as the loss kernels at 16 images of 64x64;
// here it costs a few microseconds.
//
// The forward writes d loss / d x_hat (image_grad) from the loads of the sum, and the backward
// scales it by the weight of the incoming gradients (vae_loss_cpu.cpp measures why). The
// kernels are reached through the dispatcher, so torch.compile traces them as ops.
#include <optional>
#include <string_view>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "../common.h"
#include "vae_loss.h"

namespace fastvae {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tensors4 call_vae_loss(const at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
                       double beta, c10::string_view recon, c10::string_view recon_reduction,
                       c10::string_view kl_reduction, bool compute_image_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastvae::vae_loss", "")
                             .typed<Tensors4(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, double, c10::string_view, c10::string_view,
                                             c10::string_view, bool)>();
  return op.call(x_hat, x, mu, logvar, beta, recon, recon_reduction, kl_reduction, compute_image_grad);
}

Tensors4 call_vae_loss_backward(const IncomingGrad& grad_loss, const IncomingGrad& grad_recon,
                                const IncomingGrad& grad_kl, const at::Tensor& image_grad,
                                const std::optional<at::Tensor>& x_hat, const at::Tensor& mu,
                                const at::Tensor& logvar, double beta, c10::string_view recon,
                                c10::string_view recon_reduction, c10::string_view kl_reduction, bool scale_image,
                                bool compute_grad_x) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastvae::vae_loss_backward", "")
          .typed<Tensors4(const IncomingGrad&, const IncomingGrad&, const IncomingGrad&, const at::Tensor&,
                          const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double,
                          c10::string_view, c10::string_view, c10::string_view, bool, bool)>();
  return op.call(grad_loss, grad_recon, grad_kl, image_grad, x_hat, mu, logvar, beta, recon, recon_reduction,
                 kl_reduction, scale_image, compute_grad_x);
}

std::tuple<at::Tensor, at::Tensor> call_vae_loss_backward_inplace(
    const IncomingGrad& grad_loss, const IncomingGrad& grad_recon, const IncomingGrad& grad_kl, at::Tensor& image_grad,
    const at::Tensor& mu, const at::Tensor& logvar, double beta, c10::string_view recon_reduction,
    c10::string_view kl_reduction) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastvae::vae_loss_backward_", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const IncomingGrad&, const IncomingGrad&, const IncomingGrad&, at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, double, c10::string_view, c10::string_view)>();
  return op.call(grad_loss, grad_recon, grad_kl, image_grad, mu, logvar, beta, recon_reduction, kl_reduction);
}

class VaeLossFunction : public torch::autograd::Function<VaeLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_hat, const at::Tensor& x,
                               const at::Tensor& mu, const at::Tensor& logvar, double beta, c10::string_view recon,
                               c10::string_view recon_reduction, c10::string_view kl_reduction,
                               bool compute_image_grad) {
    // The BCE forms' x gradient is a function of x_hat (recon_grad_target), so x_hat is kept only
    // for them and only when x can need a gradient.
    const bool keep_x_hat = compute_image_grad && x.requires_grad() &&
                            !recon_grad_target_is_negated(parse_recon(std::string_view(recon.data(), recon.size())));
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, recon_value, kl, image_grad] =
        call_vae_loss(x_hat, x, mu, logvar, beta, recon, recon_reduction, kl_reduction, compute_image_grad);
    ctx->save_for_backward({image_grad, keep_x_hat ? x_hat : at::Tensor(), mu, logvar});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["recon"] = std::string(recon);
    ctx->saved_data["recon_reduction"] = std::string(recon_reduction);
    ctx->saved_data["kl_reduction"] = std::string(kl_reduction);
    ctx->saved_data["compute_image_grad"] = compute_image_grad;
    // image_grad is an intermediate, never differentiated. Outputs nobody differentiates get an
    // undefined gradient rather than zeros, which for image_grad would be an image-sized fill.
    ctx->mark_non_differentiable({image_grad});
    ctx->set_materialize_grads(false);
    return {loss, recon_value, kl, image_grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_order_backward("fastvae::vae_loss");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& image_grad = saved[0];
    const at::Tensor& x_hat = saved[1];
    const at::Tensor& mu = saved[2];
    const at::Tensor& logvar = saved[3];
    const bool needs_x_hat = ctx->needs_input_grad(0), needs_x = ctx->needs_input_grad(1);
    TORCH_CHECK(!(needs_x_hat || needs_x) || ctx->saved_data["compute_image_grad"].toBool(),
                "fastvae::vae_loss was called with compute_image_grad=False, so it cannot give x_hat or x a "
                "gradient");
    // The gradient of an output nobody used is undefined, passed on as absent (weight 0).
    const auto incoming = [](const at::Tensor& grad) { return grad.defined() ? IncomingGrad(grad) : std::nullopt; };
    const IncomingGrad grad_loss = incoming(grads[0]), grad_recon = incoming(grads[1]), grad_kl = incoming(grads[2]);
    const double beta = ctx->saved_data["beta"].toDouble();
    const std::string& recon = ctx->saved_data["recon"].toStringRef();
    const std::string& recon_reduction = ctx->saved_data["recon_reduction"].toStringRef();
    const std::string& kl_reduction = ctx->saved_data["kl_reduction"].toStringRef();
    // When only x_hat needs the image gradient and the graph is freed after this backward,
    // nobody else will read the saved image_grad: it is scaled in place (skipped on the device
    // when the weight is 1, as for loss.backward()) and handed over as grad_x_hat, so the
    // backward makes no image-sized tensor and, for loss.backward(), no pass over the image.
    if (needs_x_hat && !needs_x && !torch::autograd::get_current_graph_task_keep_graph()) {
      at::Tensor image_grad_out = image_grad;
      auto [grad_mu, grad_logvar] = call_vae_loss_backward_inplace(grad_loss, grad_recon, grad_kl, image_grad_out, mu,
                                                                    logvar, beta, recon_reduction, kl_reduction);
      return {image_grad_out, at::Tensor(), grad_mu,     grad_logvar, at::Tensor(),
              at::Tensor(),   at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto [grad_x_hat, grad_x, grad_mu, grad_logvar] = call_vae_loss_backward(
        grad_loss, grad_recon, grad_kl, image_grad, x_hat.defined() ? std::optional<at::Tensor>(x_hat) : std::nullopt,
        mu, logvar, beta, recon, recon_reduction, kl_reduction, needs_x_hat, needs_x);
    return {needs_x_hat ? grad_x_hat : at::Tensor(), needs_x ? grad_x : at::Tensor(), grad_mu, grad_logvar,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensors4 vae_loss_autograd(const at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& mu,
                           const at::Tensor& logvar, double beta, c10::string_view recon,
                           c10::string_view recon_reduction, c10::string_view kl_reduction, bool compute_image_grad) {
  const variable_list out = VaeLossFunction::apply(x_hat, x, mu, logvar, beta, recon, recon_reduction, kl_reduction,
                                                   compute_image_grad);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, Autograd, m) { m.impl("vae_loss", &vae_loss_autograd); }

}  // namespace fastvae
