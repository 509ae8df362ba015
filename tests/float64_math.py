"""The latent ops' math in float64, written here independently of fastvae: the oracle their
tests compare against. Differentiable in mu and logvar, so that gradient tests differentiate it."""

from __future__ import annotations

import torch

import philox


def philox_eps(seed: int, shape) -> torch.Tensor:
    """The noise the kernels draw for ``shape`` under ``seed`` (tests/philox.py's model), float64 on the CPU."""
    return torch.from_numpy(philox.randn_like(seed, tuple(shape))).double()


def float64_z(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return mu.double() + torch.exp(0.5 * logvar.double()) * eps.to(mu.device)


def float64_kl(mu: torch.Tensor, logvar: torch.Tensor, reduction: str) -> torch.Tensor:
    mu, logvar = mu.double(), logvar.double()
    elementwise = -0.5 * (1 + logvar - mu**2 - torch.exp(logvar))
    if reduction == "none":
        return elementwise
    divisor = {"sum": 1, "batchmean": mu.shape[0], "mean": mu.numel()}[reduction]
    return elementwise.sum() / divisor


def float64_kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Each sample's total, as a loop over the samples of the flattened float64 terms."""
    mu, logvar = mu.double().flatten(1), logvar.double().flatten(1)
    totals = [(-0.5 * (1 + lv - m * m - lv.exp())).sum() for m, lv in zip(mu, logvar)]
    return torch.stack(totals) if totals else torch.zeros(0, dtype=torch.float64)
