"""The yardstick: every VAE op written the obvious way in plain PyTorch.

The fused backends must agree with these functions, and are timed against them.

Reductions, of the reconstruction and the KL term alike (:func:`vae_loss` takes one for both,
or one for each):

* ``"sum"``: totals over the whole batch (the classic VAE recipe).
* ``"batchmean"``: totals divided by the batch size ``shape[0]``, the per-sample ELBO scale.
* ``"mean"``: totals divided by the number of elements of that term's tensor.
* ``"none"`` (:func:`kl_divergence` and :func:`reparameterize_kl` only): the elementwise KL.
* ``"per_sample"`` (:func:`kl_divergence` and :func:`reparameterize_kl` only): the totals of
  each sample, over every dim but the first: shape ``(B,)`` for ``(B, ...)`` latents of at
  least 2 dims (diffusers' posterior KL for ``(B, C, H, W)``).

Dtypes: ``z`` comes back in the input dtype; the KL and the losses are computed and
returned in float32 (float64 for float64 inputs), whatever the input dtype.

Noise: the reference draws ``eps`` with torch's own generator (``torch.randn``), seeded by
``seed`` when one is given. The fused backends draw it with Philox inside the kernel, so the
two agree in distribution, and agree exactly given the same ``eps``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvae._checks import (
    accumulate_dtype,
    check_kl_latents,
    check_latents,
    check_seed,
    check_vae_loss,
    promote_pair,
    term_reductions,
)


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
    check_kl_latents(mu, logvar, reduction)
    acc = accumulate_dtype(mu.dtype)
    mu, logvar = mu.to(acc), logvar.to(acc)
    elementwise = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    if reduction == "none":
        return elementwise
    if reduction == "per_sample":
        return elementwise.sum(dim=tuple(range(1, elementwise.dim())))
    return _scale(elementwise.sum(), reduction, elementwise)


def reparameterize_kl(
    mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "sum", seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample z and compute the KL term of the same latents: ``(z, kl)``."""
    check_kl_latents(mu, logvar, reduction)
    return reparameterize(mu, logvar, seed=seed), kl_divergence(mu, logvar, reduction=reduction)


def reconstruction_sum(x_hat: torch.Tensor, x: torch.Tensor, recon: str) -> torch.Tensor:
    """The summed reconstruction term ``recon`` of :func:`vae_loss`, in ``x_hat``'s dtype."""
    if recon == "mse":
        return F.mse_loss(x_hat, x, reduction="sum")
    if recon == "l1":
        return F.l1_loss(x_hat, x, reduction="sum")
    if recon == "bce":
        return F.binary_cross_entropy(x_hat, x, reduction="sum")
    return F.binary_cross_entropy_with_logits(x_hat, x, reduction="sum")


def vae_loss(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    beta: float = 1.0,
    reduction: str = "sum",
    recon: str = "mse",
    recon_reduction: str | None = None,
    kl_reduction: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The negative ELBO: ``(loss, recon, kl)`` with ``loss = recon + beta * kl``.

    ``recon`` is the reconstruction term, the negative log-likelihood of ``x`` under the decoder's
    output ``x_hat`` summed over the elements, as torch's losses define it:

    * ``"mse"``: squared error (a Gaussian decoder), ``F.mse_loss``;
    * ``"l1"``: absolute error (a Laplace decoder), ``F.l1_loss``;
    * ``"bce"``: ``x_hat`` is a probability, ``F.binary_cross_entropy`` (each log clamped at -100);
    * ``"bce_logits"``: ``x_hat`` is a logit, ``F.binary_cross_entropy_with_logits``, the
      numerically stable form of the two.

    The BCE forms take targets ``x`` in [0, 1]; others are computed by the same formula, as torch
    does. ``recon_reduction`` and ``kl_reduction`` ("sum", "batchmean" or "mean") override
    ``reduction`` for their term. Pairs of different dtypes are promoted, as torch's losses do.
    A term averaged ("mean", "batchmean") over no elements or samples raises ValueError, where
    torch's losses return NaN; "sum" of nothing is 0.
    """
    x_hat, x = promote_pair(x_hat, x)
    mu, logvar = promote_pair(mu, logvar)
    recon_reduction, kl_reduction = term_reductions(reduction, recon_reduction, kl_reduction)
    check_vae_loss(x_hat, x, mu, logvar, beta, recon, recon_reduction, kl_reduction)
    acc = accumulate_dtype(x.dtype)
    recon_value = _scale(reconstruction_sum(x_hat.to(acc), x.to(acc), recon), recon_reduction, x)
    kl = kl_divergence(mu, logvar, reduction=kl_reduction).to(recon_value.dtype)
    return recon_value + float(beta) * kl, recon_value, kl
