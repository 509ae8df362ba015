"""The yardstick: every VAE op written the obvious way in plain PyTorch.

The fused backends must agree with these functions, and are timed against them.

Reductions, the same for the reconstruction and the KL term:

* ``"sum"``: totals over the whole batch (the classic VAE recipe).
* ``"batchmean"``: totals divided by the batch size ``shape[0]``, the per-sample ELBO scale.
* ``"mean"``: totals divided by the number of elements of that term's tensor.
* ``"none"`` (:func:`kl_divergence` and :func:`reparameterize_kl` only): the elementwise KL.

Dtypes: ``z`` comes back in the input dtype; the KL and the losses are computed and
returned in float32 (float64 for float64 inputs), whatever the input dtype.

Noise: the reference draws ``eps`` with torch's own generator (``torch.randn``), seeded by
``seed`` when one is given. The fused backends draw it with Philox inside the kernel, so the
two agree in distribution, and agree exactly given the same ``eps``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvae._checks import accumulate_dtype, check_latents, check_seed, check_vae_loss, promote_pair


def _scale(total: torch.Tensor, reduction: str, like: torch.Tensor) -> torch.Tensor:
    """Turn the sum over ``like``'s elements into the requested reduction."""
    if reduction == "batchmean":
        return total / like.shape[0]
    if reduction == "mean":
        return total / like.numel()
    return total


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
    """z = mu + exp(0.5 * logvar) * eps with eps ~ N(0, 1)."""
    check_latents(mu, logvar)
    check_seed(seed)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=mu.device)
        generator.manual_seed(seed)
    eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) = -0.5 * (1 + logvar - mu^2 - exp(logvar)), reduced."""
    check_latents(mu, logvar, reduction)
    acc = accumulate_dtype(mu.dtype)
    mu, logvar = mu.to(acc), logvar.to(acc)
    elementwise = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    if reduction == "none":
        return elementwise
    return _scale(elementwise.sum(), reduction, elementwise)


def reparameterize_kl(
    mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "sum", seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample z and compute the KL term of the same latents: ``(z, kl)``."""
    check_latents(mu, logvar, reduction)
    return reparameterize(mu, logvar, seed=seed), kl_divergence(mu, logvar, reduction=reduction)


def vae_loss(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    beta: float = 1.0,
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The negative ELBO with a Gaussian decoder: ``(loss, recon, kl)``.

    ``recon`` is the squared error between ``x_hat`` and ``x`` and ``loss = recon + beta * kl``,
    both terms reduced with ``reduction`` ("sum", "batchmean" or "mean"). Pairs of different
    dtypes are promoted, as ``F.mse_loss`` does.
    """
    x_hat, x = promote_pair(x_hat, x)
    mu, logvar = promote_pair(mu, logvar)
    check_vae_loss(x_hat, x, mu, logvar, beta, reduction)
    acc = accumulate_dtype(x.dtype)
    recon = _scale(F.mse_loss(x_hat.to(acc), x.to(acc), reduction="sum"), reduction, x)
    kl = kl_divergence(mu, logvar, reduction=reduction).to(recon.dtype)
    return recon + beta * kl, recon, kl
