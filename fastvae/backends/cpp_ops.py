"""The C++/CUDA backend: the operators of ``fastvae._C`` (declared in csrc/ops.cpp).

This module gives each operator what Python owns: a fake kernel (``register_fake``) so
``torch.compile`` and ``opcheck`` can trace it, and an autograd formula
(``register_autograd``) whose backward is the operator's own backward op. It registers them
only when the extension is loaded; otherwise :func:`unavailable_reason` says why not.

* ``vae_loss``: CPU kernels always, CUDA kernels when the extension was built with them.
* ``reparameterize``, ``kl_divergence``, ``reparameterize_kl``: CPU only, all through
  ``fastvae::reparameterize_kl``. They draw the same Philox stream as the Triton kernels, so a
  seed gives the same ``z`` on CPU and GPU; sampling on CUDA is the Triton backend's job.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastvae._checks import accumulate_dtype
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
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The image gradient is written by the forward pass, so only when a backward can need it.
    compute_image_grad = torch.is_grad_enabled() and (x_hat.requires_grad or x.requires_grad)
    loss, recon, kl, _ = torch.ops.fastvae.vae_loss.default(
        x_hat, x, mu, logvar, float(beta), reduction, compute_image_grad
    )
    return loss, recon, kl


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
    z, _ = torch.ops.fastvae.reparameterize_kl.default(mu, logvar, seed_tensor(seed), "sum", True, False)
    return z


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    _, kl = torch.ops.fastvae.reparameterize_kl.default(mu, logvar, None, reduction, False, True)
    return kl


def reparameterize_kl(
    mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "sum", seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fastvae.reparameterize_kl.default(mu, logvar, seed_tensor(seed), reduction, True, True)


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd. Outputs are contiguous, as the C++ kernels write them.


def _empty(shape, dtype, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device)


def _vae_loss_fake(x_hat, x, mu, logvar, beta, reduction, compute_image_grad):
    acc = accumulate_dtype(x.dtype)
    image_grad = _empty(x.shape if compute_image_grad else (0,), x.dtype, x)
    return _empty((), acc, x), _empty((), acc, x), _empty((), acc, x), image_grad


def _vae_loss_backward_fake(grad_loss, grad_recon, grad_kl, image_grad, mu, logvar, beta, reduction, scale_image,
                            compute_grad_x):
    grad_x_hat = _empty(image_grad.shape if scale_image else (0,), image_grad.dtype, image_grad)
    grad_x = _empty(image_grad.shape if compute_grad_x else (0,), image_grad.dtype, image_grad)
    return grad_x_hat, grad_x, _empty(mu.shape, mu.dtype, mu), _empty(logvar.shape, logvar.dtype, logvar)


def _vae_loss_setup_context(ctx, inputs, output):
    _, _, mu, logvar, beta, reduction, compute_image_grad = inputs
    ctx.save_for_backward(output[3], mu, logvar)
    ctx.beta, ctx.reduction, ctx.has_image_grad = beta, reduction, compute_image_grad
    # image_grad is an intermediate, never differentiated; and unused outputs get None rather
    # than zeros, which for image_grad would be an image-sized fill on every backward.
    ctx.mark_non_differentiable(output[3])
    ctx.set_materialize_grads(False)


def _image_weight_is_one(grad_loss, grad_recon) -> bool:
    """Whether the forward's image gradient is already the answer, as for ``loss.backward()``.

    Asked only where reading the weight is free: plain eager CPU tensors. On CUDA it would
    synchronize, and when traced (torch.compile, make_fx, fake or functorch tensors) it is
    data-dependent; there the kernel scales (by 1) instead.
    """
    grads = (grad_loss, grad_recon)
    traced = (
        torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
        or any(type(g) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(g) for g in grads)
    )
    if traced or grad_loss.device.type != "cpu":
        return False
    return (grad_loss + grad_recon).item() == 1.0


def _vae_loss_backward(ctx, grad_loss, grad_recon, grad_kl, _grad_image_grad):
    image_grad, mu, logvar = ctx.saved_tensors
    zero = None
    if grad_loss is None or grad_recon is None or grad_kl is None:
        zero = torch.zeros((), dtype=accumulate_dtype(image_grad.dtype), device=image_grad.device)
    grad_loss, grad_recon, grad_kl = (zero if g is None else g for g in (grad_loss, grad_recon, grad_kl))
    needs_x_hat, needs_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if (needs_x_hat or needs_x) and not ctx.has_image_grad:
        raise RuntimeError(
            "fastvae::vae_loss was called with compute_image_grad=False, so it cannot give x_hat or x a gradient"
        )
    reuse = needs_x_hat and _image_weight_is_one(grad_loss, grad_recon)
    grad_x_hat, grad_x, grad_mu, grad_logvar = torch.ops.fastvae.vae_loss_backward.default(
        grad_loss, grad_recon, grad_kl, image_grad, mu, logvar, ctx.beta, ctx.reduction, needs_x_hat and not reuse,
        needs_x,
    )
    if reuse:
        grad_x_hat = image_grad
    return (grad_x_hat if needs_x_hat else None, grad_x if needs_x else None, grad_mu, grad_logvar, None, None, None)


def _reparameterize_kl_fake(mu, logvar, seed, reduction, compute_z, compute_kl):
    z = _empty(mu.shape if compute_z else (0,), mu.dtype, mu)
    kl_shape = (0,) if not compute_kl else mu.shape if reduction == "none" else ()
    return z, _empty(kl_shape, accumulate_dtype(mu.dtype), mu)


def _reparameterize_kl_backward_fake(grad_z, grad_kl, z, mu, logvar, reduction):
    return _empty(mu.shape, mu.dtype, mu), _empty(logvar.shape, logvar.dtype, logvar)


def _reparameterize_kl_setup_context(ctx, inputs, output):
    mu, logvar, seed, reduction, compute_z, compute_kl = inputs
    # mu and logvar, and z (which the decoder keeps anyway) when it was drawn: the backward takes
    # dz/dlogvar from z - mu rather than regenerating eps, the costly part on a CPU.
    ctx.save_for_backward(output[0] if compute_z else None, mu, logvar)
    ctx.reduction, ctx.compute_z, ctx.compute_kl = reduction, compute_z, compute_kl
    # An unused output gets None, which the backward op skips, rather than zeros to read.
    ctx.set_materialize_grads(False)


def _reparameterize_kl_backward(ctx, grad_z, grad_kl):
    z, mu, logvar = ctx.saved_tensors
    # The gradient of an output that was not computed (an empty tensor) is dropped.
    grad_mu, grad_logvar = torch.ops.fastvae.reparameterize_kl_backward.default(
        grad_z if ctx.compute_z else None, grad_kl if ctx.compute_kl else None, z, mu, logvar, ctx.reduction
    )
    return grad_mu, grad_logvar, None, None, None, None


if extension_error is None:
    torch.library.register_fake("fastvae::vae_loss")(_vae_loss_fake)
    torch.library.register_fake("fastvae::vae_loss_backward")(_vae_loss_backward_fake)
    torch.library.register_fake("fastvae::reparameterize_kl")(_reparameterize_kl_fake)
    torch.library.register_fake("fastvae::reparameterize_kl_backward")(_reparameterize_kl_backward_fake)
    torch.library.register_autograd(
        "fastvae::vae_loss", _vae_loss_backward, setup_context=_vae_loss_setup_context
    )
    torch.library.register_autograd(
        "fastvae::reparameterize_kl", _reparameterize_kl_backward, setup_context=_reparameterize_kl_setup_context
    )
