"""The C++/CUDA backend: the operators of ``fastvae._C`` (declared in csrc/ops.cpp).

The extension registers each operator's kernels and its autograd (in C++, so a training step
spends no Python on the graph nodes; the backward of each op is its own backward op). This
module adds what only Python can give: fake kernels (``register_fake``), so ``torch.compile``
and ``opcheck`` can trace the ops. It registers them only when the extension is loaded;
otherwise :func:`unavailable_reason` says why not.

* ``vae_loss``: CPU kernels always, CUDA kernels when the extension was built with them.
* ``reparameterize``, ``kl_divergence``, ``reparameterize_kl``: CPU only, all through
  ``fastvae::reparameterize_kl``. They draw the same Philox stream as the Triton kernels, so a
  seed gives the same ``z`` on CPU and GPU (to a few float32 ulps); sampling on CUDA is the
  Triton backend's job. When a backward can follow, the forward also saves the float32 ``eps``
  it drew, from which the backward takes dz/dlogvar exactly.
"""

from __future__ import annotations

import torch

from fastvae._checks import accumulate_dtype
from fastvae.backends._latent_outputs import empty_kl, empty_latent_like
from fastvae._extension import extension_error
from fastvae._seed import seed_tensor

OPS = frozenset({"reparameterize", "kl_divergence", "reparameterize_kl", "vae_loss"})

# Whether the extension was compiled with its CUDA kernels, asked once: dynamo cannot trace
# the dispatcher query, and the answer cannot change after the library is loaded.
_HAS_CUDA_VAE_LOSS = extension_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastvae::vae_loss", "CUDA"
)


def unavailable_reason(device: torch.device, op: str | None = None) -> str | None:
    """Why the C++ backend cannot run ``op`` (any of :data:`OPS` when None) on ``device``."""
    if extension_error is not None:
        return f"fastvae._C is not loaded ({extension_error})"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if op != "vae_loss":
            return "the C++ backend runs vae_loss on CUDA; CUDA sampling is the Triton backend's job"
        if not _HAS_CUDA_VAE_LOSS:
            return "fastvae._C was built without its CUDA kernels (rebuild with a CUDA toolkit present)"
        return None if torch.cuda.is_available() else "CUDA is not available"
    return f"the C++ backend runs on CPU and CUDA tensors, not {device.type}"


# ---------------------------------------------------------------------------------------------
# Public functions, with the signatures of fastvae.reference (inputs validated by fastvae.ops)


def vae_loss(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    beta: float = 1.0,
    recon: str = "mse",
    recon_reduction: str = "sum",
    kl_reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The image gradient is written by the forward pass, so only when a backward can need it.
    compute_image_grad = torch.is_grad_enabled() and (x_hat.requires_grad or x.requires_grad)
    loss, recon_value, kl, _ = torch.ops.fastvae.vae_loss.default(
        x_hat, x, mu, logvar, float(beta), recon, recon_reduction, kl_reduction, compute_image_grad
    )
    return loss, recon_value, kl


def _needs_noise(mu: torch.Tensor, logvar: torch.Tensor) -> bool:
    # The backward of z reads the forward's eps, so it is written only when a backward can need it.
    return torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
    z, _, _ = torch.ops.fastvae.reparameterize_kl.default(
        mu, logvar, seed_tensor(seed, mu.device), "sum", True, False, _needs_noise(mu, logvar)
    )
    return z


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    _, kl, _ = torch.ops.fastvae.reparameterize_kl.default(mu, logvar, None, reduction, False, True, False)
    return kl


def reparameterize_kl(
    mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "sum", seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    z, kl, _ = torch.ops.fastvae.reparameterize_kl.default(
        mu, logvar, seed_tensor(seed, mu.device), reduction, True, True, _needs_noise(mu, logvar)
    )
    return z, kl


# ---------------------------------------------------------------------------------------------
# Fake kernels. Outputs are contiguous, as the C++ kernels write them, except the latent-shaped
# outputs of reparameterize_kl and its backward, which keep a channels-last input's format.


def _empty(shape, dtype, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device)


def _latent_grads(mu, logvar):
    return _empty(mu.shape, mu.dtype, mu), _empty(logvar.shape, logvar.dtype, logvar)


def _vae_loss_fake(x_hat, x, mu, logvar, beta, recon, recon_reduction, kl_reduction, compute_image_grad):
    acc = accumulate_dtype(x.dtype)
    image_grad = _empty(x.shape if compute_image_grad else (0,), x.dtype, x)
    return _empty((), acc, x), _empty((), acc, x), _empty((), acc, x), image_grad


def _vae_loss_backward_fake(grad_loss, grad_recon, grad_kl, image_grad, x_hat, mu, logvar, beta, recon,
                            recon_reduction, kl_reduction, scale_image, compute_grad_x):
    grad_x_hat = _empty(image_grad.shape if scale_image else (0,), image_grad.dtype, image_grad)
    grad_x = _empty(image_grad.shape if compute_grad_x else (0,), image_grad.dtype, image_grad)
    return grad_x_hat, grad_x, *_latent_grads(mu, logvar)


def _vae_loss_backward_inplace_fake(grad_loss, grad_recon, grad_kl, image_grad, mu, logvar, beta, recon_reduction,
                                    kl_reduction):
    return _latent_grads(mu, logvar)


def _reparameterize_kl_fake(mu, logvar, seed, reduction, compute_z, compute_kl, save_noise):
    z = empty_latent_like(mu) if compute_z else _empty((0,), mu.dtype, mu)
    kl = empty_kl(mu, reduction) if compute_kl else _empty((0,), accumulate_dtype(mu.dtype), mu)
    noise = _empty(mu.shape if compute_z and save_noise else (0,), torch.float32, mu)
    return z, kl, noise


def _reparameterize_kl_backward_fake(grad_z, grad_kl, noise, mu, logvar, reduction):
    return empty_latent_like(mu), empty_latent_like(logvar)


if extension_error is None:
    torch.library.register_fake("fastvae::vae_loss")(_vae_loss_fake)
    torch.library.register_fake("fastvae::vae_loss_backward")(_vae_loss_backward_fake)
    torch.library.register_fake("fastvae::vae_loss_backward_")(_vae_loss_backward_inplace_fake)
    torch.library.register_fake("fastvae::reparameterize_kl")(_reparameterize_kl_fake)
    torch.library.register_fake("fastvae::reparameterize_kl_backward")(_reparameterize_kl_backward_fake)
