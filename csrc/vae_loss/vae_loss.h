// What the CPU and CUDA implementations of fastvae::vae_loss share: input checks, the weights
// the backward applies, and output allocation.
#pragma once

#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include <ATen/core/Tensor.h>

#include "../common.h"
#include "../fastvae_math.h"

namespace fastvae {

// "mse", "l1", "bce" or "bce_logits".
Recon parse_recon(std::string_view recon);

// Calls f(std::integral_constant<Recon, recon>{}), so kernels take the term as a template
// parameter and each form compiles to straight-line code.
template <typename F>
void dispatch_recon(Recon recon, const F& f) {
  switch (recon) {
    case Recon::Mse:
      return f(std::integral_constant<Recon, Recon::Mse>{});
    case Recon::L1:
      return f(std::integral_constant<Recon, Recon::L1>{});
    case Recon::Bce:
      return f(std::integral_constant<Recon, Recon::Bce>{});
    case Recon::BceLogits:
      return f(std::integral_constant<Recon, Recon::BceLogits>{});
  }
}

// The reduction of each term.
struct VaeLossReductions {
  Reduction recon, kl;
};

// Checks the inputs (naming both sides on mismatch) and parses the reductions. x_hat/x may have
// another dtype than mu/logvar: each term accumulates in its own inputs' accumulate type.
VaeLossReductions check_vae_loss_inputs(const at::Tensor& x_hat, const at::Tensor& x, const at::Tensor& mu,
                                        const at::Tensor& logvar, std::string_view recon_reduction,
                                        std::string_view kl_reduction);

// An incoming gradient of (loss, recon or kl) may be absent: autograd leaves the gradient of an
// output nobody used undefined, and it weighs 0. The kernels read a present one through its
// pointer (a CUDA backward on the device, so it needs no host synchronization) and take a null
// pointer as 0, so that no backward makes a zero tensor (on a GPU, one more launch per call).
using IncomingGrad = std::optional<at::Tensor>;

template <typename acc_t>
const acc_t* incoming_grad_ptr(const IncomingGrad& grad) {
  return grad.has_value() && grad->defined() ? grad->const_data_ptr<acc_t>() : nullptr;
}

template <typename acc_t>
acc_t incoming_grad_value(const IncomingGrad& grad) {
  const acc_t* value = incoming_grad_ptr<acc_t>(grad);
  return value != nullptr ? *value : acc_t(0);
}

// The backward's inputs: image_grad (x's dtype, as the forward wrote it, or empty when no image
// gradient is needed) next to mu/logvar, and the incoming gradients of (loss, recon, kl), each
// absent or a 0-dim tensor of x's accumulate type (kl is returned in it too) on the same device.
VaeLossReductions check_vae_loss_backward_inputs(const IncomingGrad& grad_loss, const IncomingGrad& grad_recon,
                                                 const IncomingGrad& grad_kl, const at::Tensor& image_grad,
                                                 const at::Tensor& mu, const at::Tensor& logvar,
                                                 std::string_view recon_reduction, std::string_view kl_reduction);

// The same for vae_loss_backward_, which scales image_grad in place: it must also be the
// contiguous tensor the forward wrote.
VaeLossReductions check_vae_loss_backward_inplace_inputs(const IncomingGrad& grad_loss, const IncomingGrad& grad_recon,
                                                         const IncomingGrad& grad_kl, const at::Tensor& image_grad,
                                                         const at::Tensor& mu, const at::Tensor& logvar,
                                                         std::string_view recon_reduction,
                                                         std::string_view kl_reduction);

// vae_loss_backward's grad_x for the BCE forms is a function of x_hat (recon_grad_target), which
// must then be given, like image_grad. Returns whether it is needed.
bool check_target_grad_input(Recon recon, bool compute_grad_x, const std::optional<at::Tensor>& x_hat,
                             const at::Tensor& image_grad);

// The image gradient the forward writes is d recon / d x_hat up to a factor the backward's weight
// supplies. In float32 and float64 it includes the reduction's 1 / divisor, so the gradient of
// loss.backward() is finished in the forward. float16 and bfloat16 leave it to the backward,
// which multiplies by it in float32 together with the incoming gradient: 2 (x_hat - x) / N of a
// 64x3x64x64 mean is around 1e-6, below float16's normal range, and a GradScaler's 65536 applied
// afterwards would only scale the rounding error of subnormals up.
inline bool image_grad_includes_divisor(at::ScalarType image) {
  return image == at::kFloat || image == at::kDouble;
}

// (loss, recon, kl) as 0-dim tensors of x's accumulate type, and image_grad: like x when
// compute_image_grad, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_vae_loss_outputs(const at::Tensor& x,
                                                                                  bool compute_image_grad);

// grad_mu and grad_logvar, like mu.
std::tuple<at::Tensor, at::Tensor> empty_latent_grads(const at::Tensor& mu);

// Backward outputs: grad_x_hat and grad_x like image_grad when asked for, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_vae_loss_backward_outputs(
    const at::Tensor& image_grad, const at::Tensor& mu, bool scale_image, bool compute_grad_x);

}  // namespace fastvae
