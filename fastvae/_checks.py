"""Input validation shared by every backend, run before any kernel is launched.

Each check raises TypeError (wrong kind of thing) or ValueError (right kind, wrong value)
with a message that names what was expected and what came.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# "none" and "per_sample" are only meaningful where the result need not be a scalar (the KL
# alone): the elementwise KL, and its totals per sample (over every dim but the first).
KL_REDUCTIONS = ("sum", "batchmean", "mean", "none", "per_sample")
LOSS_REDUCTIONS = ("sum", "batchmean", "mean")
# vae_loss's reconstruction terms: torch's mse_loss, l1_loss, binary_cross_entropy (x_hat a
# probability) and binary_cross_entropy_with_logits (x_hat a logit).
RECONS = ("mse", "l1", "bce", "bce_logits")

# Seeds feed Philox as a 64-bit key; negative values would alias positive ones after the cast.
SEED_LIMIT = 2**63


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name where it has none: why, in one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_float_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )


def check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two tensors that are combined elementwise: same shape, dtype and device."""
    check_float_tensor(name_a, a)
    check_float_tensor(name_b, b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {shape_str(a)} but {name_b} has {shape_str(b)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; pass the same dtype")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def check_reduction(reduction: object, allowed: tuple[str, ...], name: str = "reduction") -> None:
    if reduction not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")


def check_batched(name: str, t: torch.Tensor, reduction: str) -> None:
    if reduction == "batchmean" and t.dim() == 0:
        raise ValueError(f"reduction 'batchmean' needs a batch dimension, but {name} is 0-dimensional")
    if reduction == "per_sample" and t.dim() < 2:
        raise ValueError(
            f"reduction 'per_sample' sums over every dim but the first, so it needs at least 2 dims, "
            f"but {name} has shape {shape_str(t)}"
        )


def check_seed(seed: object) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def check_latents(mu: torch.Tensor, logvar: torch.Tensor) -> None:
    check_pair("mu", mu, "logvar", logvar)


def check_kl_latents(mu: torch.Tensor, logvar: torch.Tensor, reduction: object) -> None:
    """The latents and reduction of an op that reduces the KL; every value of ``reduction``,
    None included, is checked."""
    check_latents(mu, logvar)
    check_reduction(reduction, KL_REDUCTIONS)
    check_batched("mu", mu, reduction)


def promote_pair(a: object, b: object) -> tuple[object, object]:
    """Two floating tensors of different dtypes, both cast to their promoted dtype, as
    ``F.mse_loss`` does: under ``torch.autocast(bfloat16)`` the decoder's output is bfloat16
    while the data stays float32, and both are then computed in float32. Anything else comes
    back unchanged, for the checks to name."""
    if (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dtype != b.dtype
        and a.dtype in FLOAT_DTYPES
        and b.dtype in FLOAT_DTYPES
    ):
        dtype = torch.promote_types(a.dtype, b.dtype)
        return a.to(dtype), b.to(dtype)
    return a, b


def term_reductions(
    reduction: object, recon_reduction: object, kl_reduction: object
) -> tuple[object, object]:
    """vae_loss's reduction of each term: ``reduction`` unless overridden. A bad ``reduction``
    raises here, whether or not both terms override it."""
    check_reduction(reduction, LOSS_REDUCTIONS)
    return (
        reduction if recon_reduction is None else recon_reduction,
        reduction if kl_reduction is None else kl_reduction,
    )


def check_vae_loss(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: object,
    recon: object,
    recon_reduction: object,
    kl_reduction: object,
) -> None:
    check_pair("x_hat", x_hat, "x", x)
    check_pair("mu", mu, "logvar", logvar)
    if recon not in RECONS:
        raise ValueError(f"recon must be one of {', '.join(map(repr, RECONS))}, got {recon!r}")
    check_reduction(recon_reduction, LOSS_REDUCTIONS, "recon_reduction")
    check_reduction(kl_reduction, LOSS_REDUCTIONS, "kl_reduction")
    if x.dim() == 0 or mu.dim() == 0:
        raise ValueError(
            f"x and mu need a batch dimension, got x of shape {shape_str(x)} and mu of shape {shape_str(mu)}"
        )
    if x.shape[0] != mu.shape[0]:
        raise ValueError(f"x has batch size {x.shape[0]} but mu has {mu.shape[0]}")
    if x.device != mu.device:
        raise ValueError(f"x is on {x.device} but mu is on {mu.device}")
    check_averaged("reconstruction", "x", x, recon_reduction)
    check_averaged("KL", "mu", mu, kl_reduction)
    check_beta(beta)


def check_averaged(term: str, name: str, t: torch.Tensor, reduction: str) -> None:
    """A loss term averaged over none of ``t``'s elements ("mean") or samples ("batchmean") would
    be 0 / 0: NaN, which a training step takes in without a word. torch's losses return that NaN;
    a loss of fastvae refuses it, so that an empty batch is seen where it came from."""
    over = {"mean": ("elements", t.numel()), "batchmean": ("samples", t.shape[0])}.get(reduction)
    if over is not None and over[1] == 0:
        raise ValueError(
            f"reduction {reduction!r} of the {term} term averages over the {over[0]} of {name}, but {name} has "
            f"shape {shape_str(t)}: there are none, and their mean is undefined; use 'sum' (0 for none)"
        )


def check_beta(beta: object) -> None:
    """A real number that ``float(beta)`` makes finite: a Python or numpy int or float (any
    ``numbers.Real``), or a 0-dim real tensor (read as its value: no gradient reaches it)."""
    if isinstance(beta, torch.Tensor):
        if beta.dim() != 0 or beta.dtype == torch.bool or beta.is_complex():
            raise TypeError(
                f"beta must be a real number or a 0-dim real tensor, got a {beta.dtype} tensor of shape {shape_str(beta)}"
            )
        beta = beta.item()
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
    try:
        value = float(beta)
    except OverflowError:
        raise ValueError(f"beta must be finite, got a {type(beta).__name__} too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"beta must be finite, got {value}")


def _laid_out_in(t: torch.Tensor, order: tuple[int, ...]) -> bool:
    """Whether ``t``'s strides do not increase along ``order`` (dims of size 1 skipped): its
    elements lie in that order, densely or not."""
    strides = [t.stride(d) for d in order if t.shape[d] != 1]
    return all(a >= b for a, b in zip(strides, strides[1:]))


def latent_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format of the latent-shaped outputs (z, an elementwise KL, the gradients).

    An input laid out channels-last (3d), densely or as a view (diffusers' ``torch.chunk`` of
    channels-last moments), gives channels-last (3d) outputs, as torch's elementwise ops do;
    anything else, contiguous ones (a tensor laid out both ways, as with one channel, counts as
    contiguous). The C++ backend has the same rule.
    """
    for memory_format, order in ((torch.channels_last, (0, 2, 3, 1)), (torch.channels_last_3d, (0, 2, 3, 4, 1))):
        if t.dim() == len(order) and not _laid_out_in(t, tuple(range(t.dim()))) and _laid_out_in(t, order):
            return memory_format
    return torch.contiguous_format


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions and returned losses are float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
