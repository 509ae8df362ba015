// The schemas of every fastvae operator, in one place. Implementations register per device:
// vae_loss/vae_loss_cpu.cpp, vae_loss/vae_loss_cuda.cu, reparameterize_kl/reparameterize_kl_cpu.cpp;
// autograd in vae_loss/vae_loss_autograd.cpp and reparameterize_kl/reparameterize_kl_autograd.cpp.
// Fake (meta) kernels live in fastvae/backends/cpp_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fastvae, m) {
  // Where the fake kernels are: torch imports it when tracing needs them.
  m.set_python_module("fastvae.backends.cpp_ops");
  // The negative ELBO (loss = recon + beta * kl) in one pass. loss, recon and kl are 0-dim, in
  // float32 (float64 for float64 x); recon is the sum of the per-element term `recon` ("mse",
  // "l1", "bce", "bce_logits": csrc/fastvae_math.h) over x reduced with recon_reduction, kl the KL
  // over mu reduced with kl_reduction. With compute_image_grad, the same pass also writes
  // image_grad, d recon / d x_hat in x's dtype up to the factor the backward supplies (see
  // vae_loss/vae_loss.h), which the backward scales (empty otherwise), possibly in place
  // (vae_loss_backward_).
  m.def(
      "vae_loss(Tensor x_hat, Tensor x, Tensor mu, Tensor logvar, float beta, str recon, str recon_reduction,"
      " str kl_reduction, bool compute_image_grad) -> (Tensor loss, Tensor recon, Tensor kl, Tensor image_grad)");
  // Every input gradient of vae_loss in one launch, given the gradients of loss, recon and kl
  // (None weighs 0: autograd leaves the gradient of an output nobody used undefined, and the
  // backward then makes no zero tensor for it):
  // grad_x_hat = image_grad scaled by grad_loss + grad_recon unless scale_image is false (the
  // caller knows that weight is 1 and uses image_grad itself; grad_x_hat is then empty), grad_x
  // when compute_grad_x (else empty): the negated image gradient for "mse" and "l1", a function of
  // x_hat (which must then be given) for "bce" and "bce_logits"; grad_mu and grad_logvar from mu
  // and logvar.
  m.def(
      "vae_loss_backward(Tensor? grad_loss, Tensor? grad_recon, Tensor? grad_kl, Tensor image_grad, Tensor? x_hat,"
      " Tensor mu, Tensor logvar, float beta, str recon, str recon_reduction, str kl_reduction, bool scale_image,"
      " bool compute_grad_x) -> (Tensor grad_x_hat, Tensor grad_x, Tensor grad_mu, Tensor grad_logvar)");
  // The same gradients with the image gradient scaled in place, so that it can become grad_x_hat
  // itself, where the kernel skips the image when its weight is 1 (read on the device: no host
  // synchronization). Used by the autograd when nothing else will read image_grad (grad_x not
  // needed, graph not retained).
  m.def(
      "vae_loss_backward_(Tensor? grad_loss, Tensor? grad_recon, Tensor? grad_kl, Tensor(a!) image_grad,"
      " Tensor mu, Tensor logvar, float beta, str recon_reduction, str kl_reduction)"
      " -> (Tensor grad_mu, Tensor grad_logvar)");
  // z = mu + exp(0.5 * logvar) * eps with eps = tl.randn(seed, index), and the KL of the same
  // latents. seed is a 0-dim int64 CPU tensor, needed when compute_z. With save_noise (and
  // compute_z) the same pass also writes noise, the float32 eps, for the backward. An output not
  // computed is an empty tensor. reduction may be "none" (elementwise KL) or "per_sample" (kl of
  // shape (B,): each sample's total over every dim but the first; mu needs at least 2 dims).
  m.def(
      "reparameterize_kl(Tensor mu, Tensor logvar, Tensor? seed, str reduction, bool compute_z,"
      " bool compute_kl, bool save_noise) -> (Tensor z, Tensor kl, Tensor noise)");
  // (grad_mu, grad_logvar) from the gradients of z (needs the forward's noise) and of kl (either
  // may be None). dz/dlogvar is 0.5 * std * eps from the saved eps: exact at any logvar, where
  // 0.5 * (z - mu) loses std * eps to z's rounding, and on a CPU cheaper than drawing eps again.
  m.def(
      "reparameterize_kl_backward(Tensor? grad_z, Tensor? grad_kl, Tensor? noise, Tensor mu, Tensor logvar,"
      " str reduction) -> (Tensor grad_mu, Tensor grad_logvar)");
}
