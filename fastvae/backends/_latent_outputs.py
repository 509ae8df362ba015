"""Empty outputs of the latent ops, as the kernels of both backends lay them out: the fake
kernels' one rule for shapes, dtypes and memory formats."""

from __future__ import annotations

import torch

from fastvae._checks import accumulate_dtype, latent_memory_format


def empty_latent_like(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Shaped like ``like``; channels-last for a channels-last input, else contiguous."""
    return torch.empty(
        like.shape, dtype=dtype or like.dtype, device=like.device, memory_format=latent_memory_format(like)
    )


def empty_kl(mu: torch.Tensor, reduction: str) -> torch.Tensor:
    """The KL in the accumulate dtype: elementwise for "none", (B,) for "per_sample", else 0-dim."""
    acc = accumulate_dtype(mu.dtype)
    if reduction == "none":
        return empty_latent_like(mu, acc)
    shape = (mu.shape[0],) if reduction == "per_sample" else ()
    return torch.empty(shape, dtype=acc, device=mu.device)
