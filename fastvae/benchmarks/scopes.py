"""Which cases, at which sizes, each scope runs on each device."""

from __future__ import annotations

import torch

from fastvae.benchmarks.case import Case
from fastvae.benchmarks.op_cases import latent_cases, loss_cases
from fastvae.benchmarks.train_step import train_cases

# smoke: each case once in CI's quick run; core: the sizes the GPU goals name (issue tracker's
# H200 table), forward + backward only, for `make gpu-check`'s few minutes; full: everything.
SCOPES = ("smoke", "core", "full")


def cases(device: torch.device, scope: str = "full") -> list[Case]:
    """Every case of ``scope`` (one of SCOPES) for ``device``."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    quick = scope != "full"
    if device.type == "cuda":
        if scope == "core":
            latents, batches, train_batch = [(256, 128), (4096, 1024)], [256], 256
        else:
            latents = [(128, 128), (1024, 1024)] if quick else [(128, 128), (1024, 1024), (8192, 1024), (16384, 4096)]
            batches = [128] if quick else [128, 512, 2048]
            train_batch = 128
    else:
        latents = [(128, 128), (1024, 1024)] if quick else [(128, 128), (1024, 1024), (4096, 1024)]
        batches = [128] if quick else [16, 128]
        train_batch = 16
    # The other reconstruction terms at the largest batch, against the same floor; not in the
    # quick runs, where compiling their formulas would take most of their time.
    other_recons = () if quick else ("l1", "bce", "bce_logits")
    selected = (
        latent_cases(device, latents, torch.float32)
        + loss_cases(device, batches, torch.float32)
        + [c for recon in other_recons for c in loss_cases(device, batches[-1:], torch.float32, recon)]
        + train_cases(device, train_batch, compile_=scope != "smoke")
    )
    if scope == "core":
        # What a training step pays: forward + backward (and the floor they are measured against).
        selected = [c for c in selected if c.pass_ not in ("fwd", "bwd") or c.method == "floor"]
    return selected
