// Autograd for fastvae::reparameterize_kl, in C++ for the reason vae_loss_autograd.cpp gives: no
// Python on the graph node. The forward saves mu and logvar (which the caller keeps anyway) and
// the float32 eps it drew, when it was asked to (save_noise); the backward is the
// fastvae::reparameterize_kl_backward operator, reached through the dispatcher so torch.compile
// traces it as an op.
#include <optional>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../common.h"

namespace fastvae {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Tensors3 call_reparameterize_kl(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& seed,
                                c10::string_view reduction, bool compute_z, bool compute_kl, bool save_noise) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastvae::reparameterize_kl", "")
                             .typed<Tensors3(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                             c10::string_view, bool, bool, bool)>();
  return op.call(mu, logvar, seed, reduction, compute_z, compute_kl, save_noise);
}

Tensors2 call_reparameterize_kl_backward(const std::optional<at::Tensor>& grad_z,
                                         const std::optional<at::Tensor>& grad_kl,
                                         const std::optional<at::Tensor>& noise, const at::Tensor& mu,
                                         const at::Tensor& logvar, c10::string_view reduction) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastvae::reparameterize_kl_backward", "")
                             .typed<Tensors2(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                             const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                             c10::string_view)>();
  return op.call(grad_z, grad_kl, noise, mu, logvar, reduction);
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class ReparameterizeKlFunction : public torch::autograd::Function<ReparameterizeKlFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const std::optional<at::Tensor>& seed, c10::string_view reduction, bool compute_z,
                               bool compute_kl, bool save_noise) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [z, kl, noise] = call_reparameterize_kl(mu, logvar, seed, reduction, compute_z, compute_kl, save_noise);
    // The noise is kept when it was written (and whether it was is whether it is saved).
    ctx->save_for_backward({compute_z && save_noise ? noise : at::Tensor(), mu, logvar});
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["compute_z"] = compute_z;
    ctx->saved_data["compute_kl"] = compute_kl;
    ctx->mark_non_differentiable({noise});
    // An unused output gets no gradient, which the backward op skips, rather than zeros to read.
    ctx->set_materialize_grads(false);
    return {z, kl, noise};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_first_order_backward("fastvae::reparameterize_kl");
    const variable_list saved = ctx->get_saved_variables();
    // The gradient of an output that was not computed (an empty tensor) is dropped. z's goes to
    // the backward op, which says what is missing when the noise was not saved.
    const std::optional<at::Tensor> grad_z =
        ctx->saved_data["compute_z"].toBool() ? defined_or_none(grads[0]) : std::nullopt;
    const std::optional<at::Tensor> grad_kl =
        ctx->saved_data["compute_kl"].toBool() ? defined_or_none(grads[1]) : std::nullopt;
    auto [grad_mu, grad_logvar] = call_reparameterize_kl_backward(grad_z, grad_kl, defined_or_none(saved[0]),
                                                                  saved[1], saved[2],
                                                                  ctx->saved_data["reduction"].toStringRef());
    return {grad_mu, grad_logvar, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensors3 reparameterize_kl_autograd(const at::Tensor& mu, const at::Tensor& logvar,
                                    const std::optional<at::Tensor>& seed, c10::string_view reduction, bool compute_z,
                                    bool compute_kl, bool save_noise) {
  const variable_list out =
      ReparameterizeKlFunction::apply(mu, logvar, seed, reduction, compute_z, compute_kl, save_noise);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, Autograd, m) { m.impl("reparameterize_kl", &reparameterize_kl_autograd); }

}  // namespace fastvae
