"""The public fused ops, with the same signatures as :mod:`fastvae.reference` plus ``backend=``.

``backend`` is one of:

* ``"auto"`` (default): the fastest backend that can run the op for these tensors
  (see :func:`resolve_backend`);
* ``"reference"``: :mod:`fastvae.reference`, plain PyTorch;
* ``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``"cpp"``: the ``fastvae._C`` extension (CPU tensors, and CUDA tensors for ``vae_loss``).

Inputs are validated here, once, before any backend runs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch

from fastvae import reference
from fastvae._checks import (
    check_kl_latents,
    check_latents,
    check_seed,
    check_vae_loss,
    promote_pair,
    term_reductions,
)

BACKENDS = ("auto", "reference", "triton", "cpp")
OPS = ("reparameterize", "kl_divergence", "reparameterize_kl", "vae_loss")

# "auto" tries these in order for tensors on each device type; the reference is the fallback.
# Triton on CPU only runs under its interpreter, a testing tool, so "auto" never picks it there.
_AUTO_ORDER = {"cuda": ("triton", "cpp"), "cpu": ("cpp",)}


def _backend_module(name: str) -> ModuleType:
    # Imported on first use: importing triton is slow, and TRITON_INTERPRET must be set before it.
    # Plain import statements (not importlib) so torch.compile traces through dispatch.
    if name == "triton":
        from fastvae.backends import triton_ops

        return triton_ops
    from fastvae.backends import cpp_ops

    return cpp_ops


def unavailable_reason(backend: str, op: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``, or None when it can."""
    if backend == "reference":
        return None
    try:
        module = _backend_module(backend)
    except ImportError as exc:
        return f"{backend} backend failed to import: {exc}"
    if op not in module.OPS:
        return f"{backend} backend does not implement {op}"
    return module.unavailable_reason(device, op)


def resolve_backend(op: str, device: torch.device, backend: str = "auto") -> str:
    """The backend that runs ``op`` for tensors on ``device``.

    A named backend that cannot run raises ValueError saying why; "auto" falls back to the
    reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend != "auto":
        reason = unavailable_reason(backend, op, device)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run {op} on {device}: {reason}")
        return backend
    return auto_choice(op, device)[0]


def auto_choice(op: str, device: torch.device) -> tuple[str, list[str]]:
    """The backend "auto" picks for ``op`` on ``device``, and why each faster one was passed over."""
    passed_over = []
    for candidate in _AUTO_ORDER.get(device.type, ()):
        reason = unavailable_reason(candidate, op, device)
        if reason is None:
            return candidate, passed_over
        passed_over.append(f"{candidate}: {reason}")
    return "reference", passed_over


# The function each (op, device type, backend asked for) dispatches to. What can run where is
# settled once a backend is imported (triton's interpreter, the extension's kernels, CUDA), so
# dispatch is asked once per key, not on every call; a backend that cannot run raises every time.
_implementations: dict[tuple[str, str, str], Callable] = {}


def _implementation(op: str, device: torch.device, backend: str) -> Callable:
    key = (op, device.type, backend)
    implementation = _implementations.get(key)
    if implementation is None:
        name = resolve_backend(op, device, backend)
        module = reference if name == "reference" else _backend_module(name)
        implementation = _implementations[key] = getattr(module, op)
    return implementation


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, *, seed: int | None = None, backend: str = "auto"
) -> torch.Tensor:
    """z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, 1) drawn from ``seed``.

    With ``seed=None`` the seed comes from torch's default generator, so ``torch.manual_seed``
    makes runs reproducible.
    """
    check_latents(mu, logvar)
    check_seed(seed)
    return _implementation("reparameterize", mu.device, backend)(mu, logvar, seed=seed)


def kl_divergence(
    mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "sum", backend: str = "auto"
) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)), reduced as in :mod:`fastvae.reference`."""
    check_kl_latents(mu, logvar, reduction)
    return _implementation("kl_divergence", mu.device, backend)(mu, logvar, reduction=reduction)


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    reduction: str = "sum",
    seed: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample z and reduce the KL of the same latents in one pass: ``(z, kl)``."""
    check_kl_latents(mu, logvar, reduction)
    check_seed(seed)
    impl = _implementation("reparameterize_kl", mu.device, backend)
    return impl(mu, logvar, reduction=reduction, seed=seed)


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, recon, kl)`` with ``loss = recon + beta * kl``, as :func:`fastvae.reference.vae_loss`.

    ``recon`` is "mse", "l1", "bce" (x_hat a probability) or "bce_logits" (x_hat a logit; prefer
    it to a Sigmoid and "bce"). ``recon_reduction``/``kl_reduction`` override ``reduction`` per
    term: Stable Diffusion's autoencoder takes ``recon_reduction="mean", kl_reduction="batchmean"``.
    x_hat and x of different dtypes (autocast) are computed in their promoted dtype, as are mu
    and logvar.
    """
    x_hat, x = promote_pair(x_hat, x)
    mu, logvar = promote_pair(mu, logvar)
    recon_reduction, kl_reduction = term_reductions(reduction, recon_reduction, kl_reduction)
    check_vae_loss(x_hat, x, mu, logvar, beta, recon, recon_reduction, kl_reduction)
    impl = _implementation("vae_loss", x.device, backend)
    return impl(
        x_hat, x, mu, logvar, beta=float(beta), recon=recon, recon_reduction=recon_reduction, kl_reduction=kl_reduction
    )
