"""A video VAE's posterior and loss (diffusers' AutoencoderKLWan) with and without fastvae's patch.

One case, ``video_vae_posterior``, in the same table and results file as the other benches
(bench/conftest.py): from the encoder's moments (B, 2C, T, H, W) and a decoded video, build the
posterior, draw z, take the loss; forward and backward of ``z.sum() + loss``. The loss is the
usual recipe, ``F.mse_loss(x_hat, x) + kl_weight * posterior.kl().mean()``, where diffusers' KL of
5-D latents sums dims 1..3 and leaves (B, W):

* ``eager``: diffusers' ``DiagonalGaussianDistribution`` (what ``AutoencoderKLWan.encode`` builds);
* ``patched``: fastvae's ``DiagonalGaussian`` (what a patched model's ``encode`` builds), the same
  loss code: the per-(B, W) KL is one fused reduction;
* ``fused``: the same loss in one ``vae_loss`` pass: the mean over (B, W) of the totals is
  ``beta = kl_weight / W`` with ``kl_reduction="batchmean"``.

Wan 2.1's latents: 16 channels, 4x fewer frames (plus the first) and 8x smaller frames than the
video. On a CPU 17 frames at 128x128, batch 2; on a GPU 33 frames at 256x256, batch 4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvae import ops
from fastvae.benchmarks.case import Case
from fastvae.distributions import DiagonalGaussian

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install fastvae[diffusers])")
from bench_autoencoder_kl import _posterior, posterior_loss_cases  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KL_WEIGHT = 1e-6
LATENT_CHANNELS = 16  # Wan 2.1's z_dim


def recipe_loss(x_hat, x, posterior) -> torch.Tensor:
    return F.mse_loss(x_hat, x) + KL_WEIGHT * posterior.kl().mean()


def fused_loss(x_hat, x, posterior) -> torch.Tensor:
    width = posterior.mean.shape[-1]
    return ops.vae_loss(
        x_hat, x, posterior.mean, posterior.logvar, beta=KL_WEIGHT / width,
        recon_reduction="mean", kl_reduction="batchmean",
    )[0]


def cases(device: torch.device) -> list[Case]:
    b, frames, size = (4, 33, 256) if device.type == "cuda" else (2, 17, 128)
    t, h, w = 1 + (frames - 1) // 4, size // 8, size // 8
    methods = {
        "eager": _posterior(DiagonalGaussianDistribution, recipe_loss),
        "patched": _posterior(DiagonalGaussian, recipe_loss),
        "fused": _posterior(DiagonalGaussian, fused_loss),
    }

    def make():
        moments = torch.randn(b, 2 * LATENT_CHANNELS, t, h, w, device=device)
        moments[:, LATENT_CHANNELS:].mul_(0.1)
        x = torch.rand(b, 3, frames, size, size, device=device) * 2 - 1
        x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_()
        return moments.requires_grad_(), x_hat, x

    label = f"{b}x{2 * LATENT_CHANNELS}x{t}x{h}x{w} + {b}x3x{frames}x{size}x{size}"
    n, pixels = b * LATENT_CHANNELS * t * h * w, b * 3 * frames * size * size
    return posterior_loss_cases("video_vae_posterior", methods, make, n, pixels, label)


def pytest_generate_tests(metafunc):
    if "video_vae_case" in metafunc.fixturenames:
        selected = cases(DEVICE)
        metafunc.parametrize("video_vae_case", selected, ids=[c.id for c in selected])


def test_video_vae(video_vae_case, run_case):
    run_case(video_vae_case)


def test_the_three_losses_agree():
    moments = torch.randn(2, 2 * LATENT_CHANNELS, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 5, 24, 40, generator=torch.Generator().manual_seed(1))
    x_hat = x + 0.1
    want = recipe_loss(x_hat, x, DiagonalGaussianDistribution(moments))
    for loss_fn in (recipe_loss, fused_loss):
        torch.testing.assert_close(loss_fn(x_hat, x, DiagonalGaussian(moments)), want, rtol=1e-5, atol=1e-7)
