"""The cases of the ops: the latent op (reparameterize_kl) and the loss (vae_loss), each eager,
compiled and fused, per pass, with the bytes each pass must move."""

from __future__ import annotations

import math

import torch

from fastvae import ops, reference
from fastvae.benchmarks.case import Case, compiled, passes


def _fused_backend(op: str, device: torch.device) -> str | None:
    """The fused backend for ``op`` on ``device``, or None when none can run here."""
    name = ops.auto_choice(op, device)[0]
    return None if name == "reference" else name


def latent_cases(device: torch.device, shapes: list[tuple[int, int]], dtype: torch.dtype) -> list[Case]:
    fused = _fused_backend("reparameterize_kl", device)
    methods = {
        "eager": lambda mu, lv: reference.reparameterize_kl(mu, lv),
        "compile": compiled(lambda mu, lv: reference.reparameterize_kl(mu, lv)),
    }
    if fused:
        methods["fused"] = lambda mu, lv: ops.reparameterize_kl(mu, lv, backend=fused)
    cases = []
    for b, d in shapes:
        n = b * d
        size = dtype.itemsize

        def make(b=b, d=d):
            mu = torch.randn(b, d, device=device, dtype=dtype, requires_grad=True)
            lv = (0.1 * torch.randn(b, d, device=device, dtype=dtype)).requires_grad_()
            return mu, lv

        def scalar(out):
            z, kl = out
            return z.sum() + kl

        # Forward reads mu, logvar and writes z; backward reads grad_z, z and logvar and writes
        # both gradients. The reductions' scalars are negligible.
        moved = {"fwd": 3 * n * size, "bwd": 5 * n * size, "fwd+bwd": 8 * n * size}
        for method, fn in methods.items():
            for pass_, (setup, target) in passes(fn, make, scalar).items():
                cases.append(Case("reparameterize_kl", method, pass_, f"{b}x{d}", n, moved[pass_], setup, target))
    return cases


def loss_cases(
    device: torch.device, batches: list[int], dtype: torch.dtype, recon: str = "mse", image=(3, 64, 64), latent=128
) -> list[Case]:
    """vae_loss with reconstruction term ``recon``; its sizes are labelled with it unless "mse"."""
    fused = _fused_backend("vae_loss", device)
    methods = {
        "eager": lambda *t: reference.vae_loss(*t, recon=recon),
        "compile": compiled(lambda *t: reference.vae_loss(*t, recon=recon)),
    }
    if fused:
        methods["fused"] = lambda *t: ops.vae_loss(*t, recon=recon, backend=fused)
    cases = []
    for b in batches:
        n = b * math.prod(image)
        size = dtype.itemsize

        def make(b=b):
            # Probabilities in [0, 1) serve every recon: as predictions, or as logits.
            x_hat = torch.rand(b, *image, device=device, dtype=dtype, requires_grad=True)
            x = torch.rand(b, *image, device=device, dtype=dtype)
            mu = torch.randn(b, latent, device=device, dtype=dtype, requires_grad=True)
            lv = (0.1 * torch.randn(b, latent, device=device, dtype=dtype)).requires_grad_()
            return x_hat, x, mu, lv

        # The images dominate. The loss and its gradient need x_hat and x read once and grad_x_hat
        # written once: 2N for the forward alone, 3N for both passes. The backward alone has no
        # such floor: fastvae's forward already wrote the image gradient, eager's did not.
        moved = {"fwd": 2 * n * size, "bwd": None, "fwd+bwd": 3 * n * size}
        label = f"{b}x{'x'.join(map(str, image))}"
        if recon != "mse":
            label = f"{recon}-{label}"
        for method, fn in methods.items():
            for pass_, (setup, target) in passes(fn, make, lambda out: out[0]).items():
                cases.append(Case("vae_loss", method, pass_, label, n, moved[pass_], setup, target))
        if recon != "mse":
            continue

        def sub_setup(b=b):
            a, c = torch.rand(2, b, *image, device=device, dtype=dtype)
            return a, c, torch.empty_like(a)

        cases.append(Case("vae_loss", "floor", "fwd", label, n, 3 * n * size, sub_setup, lambda a, c, out: torch.sub(a, c, out=out)))
    return cases
