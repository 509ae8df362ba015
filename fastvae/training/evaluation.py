"""Evaluation on the held-out set, and the PNG grids written with each checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fastvae import ops
from fastvae._workers import start
from fastvae.images import save_grid, side_by_side
from fastvae.model import VAE
from fastvae.training.distributed import World
from fastvae.training.errors import DivergedError
from fastvae.training.run_folder import MetricsLog, kept

# A latent dimension is active when its posterior mean varies over the data more than this
# (Burda et al., 2016); the count falling towards 0 is posterior collapse.
ACTIVE_UNIT_THRESHOLD = 0.01


@torch.no_grad()
def evaluate(model: VAE, loader: DataLoader, device: torch.device, autocast, backend: str) -> dict:
    """Per-image negative ELBO (beta = 1, one sample of z, fixed seeds) on the held-out set, and
    the number of active latent units."""
    model.eval()
    recon = kl = 0.0
    means = []
    for i, x in enumerate(start(loader)):
        x = x.to(device)
        with autocast():
            mu, logvar = model.encode(x)
            z = ops.reparameterize(mu, logvar, seed=i, backend=model.backend)
            x_hat = model.decode(z)
            _, r, k = ops.vae_loss(
                x_hat, x, mu, logvar, reduction="sum", recon=model.recon, backend=backend
            )
        recon += r.item()
        kl += k.item()
        means.append(mu.float())
    model.train()
    n = len(loader.dataset)
    active = int((torch.cat(means).var(0) > ACTIVE_UNIT_THRESHOLD).sum()) if n > 1 else 0
    return {"eval_loss": (recon + kl) / n, "eval_recon": recon / n, "eval_kl": kl / n, "active_units": active}


def write_grids(model: VAE, images: torch.Tensor, out: Path, step: int, seed: int) -> list[Path]:
    """Reconstructions (each original beside its reconstruction), 64 prior samples and latent
    interpolations from each of the first 8 images to the next."""
    generator = torch.Generator().manual_seed(seed)
    pairs = images[:8], images.roll(-1, 0)[:8]
    return [
        save_grid(side_by_side(images, model.reconstruct(images)), out / f"reconstructions_{step:06d}.png", 8),
        save_grid(model.sample(64, generator=generator), out / f"samples_{step:06d}.png", 8),
        save_grid(model.interpolate(*pairs, steps=10).flatten(0, 1), out / f"interpolations_{step:06d}.png", 10),
    ]


def check_held_out(model: VAE, loader: DataLoader, device: torch.device, autocast, backend: str, step: int,
                   world: World, log: MetricsLog | None, ckpt_path: Path) -> dict | None:
    """Evaluate on rank 0 and log it there (into ``log``); the results there, None elsewhere. Every
    rank stops with DivergedError when the held-out loss is not finite: only rank 0 evaluates, so
    the others hear it from rank 0 rather than stop in their next collective."""
    results = evaluate(model, loader, device, autocast, backend) if world.master else None
    if results is not None:
        log.log({"step": step, **results})
    eval_loss = world.from_rank0(results["eval_loss"] if results is not None else 0.0, device)
    if not math.isfinite(eval_loss):
        raise DivergedError(f"held-out loss is {eval_loss} at step {step}; stopped ({kept(ckpt_path)})")
    return results
