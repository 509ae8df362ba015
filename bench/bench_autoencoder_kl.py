"""diffusers' AutoencoderKL with and without fastvae's patch.

Two cases, in the same table and results file as the other benches (bench/conftest.py):

* ``autoencoder_kl_step``: one AdamW step (encode, sample, decode, L1 mean + kl_weight * KL
  mean, backward, step) of diffusers' own model with its recipe's loss (``eager``), and of the
  patched one with fastvae's fused loss (``fused``). On a GPU, Stable Diffusion's VAE config at
  256x256, batch 8; on a CPU a small one at 64x64.
* ``autoencoder_kl_posterior``: the posterior and the loss, from the encoder's moments and a
  decoded image (not decoded from z here: the decoder is the step's): build the posterior, draw
  z, take the loss; forward and backward of ``z.sum() + loss``. diffusers'
  ``DiagonalGaussianDistribution`` with ``F.l1_loss`` eager (``eager``) and compiled
  (``compile``), fastvae's ``DiagonalGaussian`` with ``vae_loss`` eager (``fused``) and compiled
  (``fused+compile``). Moments (B, 8, H, W): SD's latents of batch B at 8H x 8W, images
  (B, 3, 8H, 8W).

The training step is not compiled here: inductor takes many minutes on the whole model on a CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvae import ops
from fastvae.benchmarks.case import Case, compiled, passes
from fastvae.distributions import DiagonalGaussian
from fastvae.integrations.diffusers import patch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install fastvae[diffusers])")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KL_WEIGHT = 1e-6  # diffusers' default
# (label, AutoencoderKL config, batch, image size)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
SMALL_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


def _model(config: dict, image_size: int) -> AutoencoderKL:
    blocks = len(config["block_out_channels"])
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        sample_size=image_size,
        **config,
    )


def diffusers_loss(x_hat, x, posterior) -> torch.Tensor:
    """The recipe of diffusers' trainers: L1 over pixels plus kl_weight times the per-sample KL's mean."""
    return F.l1_loss(x_hat, x) + KL_WEIGHT * posterior.kl().mean()


def fused_loss(x_hat, x, posterior) -> torch.Tensor:
    """The same loss in one pass of fastvae's kernels."""
    return ops.vae_loss(
        x_hat, x, posterior.mean, posterior.logvar, beta=KL_WEIGHT, recon="l1",
        recon_reduction="mean", kl_reduction="batchmean",
    )[0]


def _step_cases(device: torch.device, label: str, config: dict, batch: int, image_size: int) -> list[Case]:
    cases = []
    for method, patched, loss_fn in (("eager", False, diffusers_loss), ("fused", True, fused_loss)):
        state: list = []

        def setup(patched=patched, state=state):
            # One model per case, built on first use: building SD's VAE takes seconds.
            if not state:
                torch.manual_seed(0)
                vae = _model(config, image_size).to(device).train()
                if patched:
                    patch(vae)
                x = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
                state.extend([vae, torch.optim.AdamW(vae.parameters(), lr=1e-4), x])
            return tuple(state)

        def step(vae, optimizer, x, loss_fn=loss_fn):
            posterior = vae.encode(x).latent_dist
            x_hat = vae.decode(posterior.sample()).sample
            loss = loss_fn(x_hat, x, posterior)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        size = f"{label} b{batch} {image_size}px"
        cases.append(Case("autoencoder_kl_step", method, "step", size, batch, None, setup, step))
    return cases


def _posterior(distribution: type, loss_fn):
    def forward(moments: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = distribution(moments)
        return posterior.sample(), loss_fn(x_hat, x, posterior)

    return forward


def posterior_loss_cases(op: str, methods: dict, make, n: int, pixels: int, size: str) -> list[Case]:
    """Each pass of each ``methods[name](moments, x_hat, x) -> (z, loss)``, the gradient taken of
    ``z.sum() + loss``, for ``n`` latents and ``pixels`` image values from ``make()``."""

    def scalar(out):
        z, loss = out
        return z.sum() + loss

    # The floor, in float32: the forward reads the moments (two values a latent), x_hat and x,
    # and writes z; the backward reads the moments and writes their gradient and x_hat's.
    forward, backward = 3 * n + 2 * pixels, 4 * n + pixels
    moved = {"fwd": forward * 4, "bwd": backward * 4, "fwd+bwd": (forward + backward) * 4}
    cases = []
    for method, fn in methods.items():
        for pass_, (setup, target) in passes(fn, make, scalar).items():
            cases.append(Case(op, method, pass_, size, n, moved[pass_], setup, target))
    return cases


def _posterior_cases(device: torch.device, shapes: list[tuple[int, int, int]]) -> list[Case]:
    methods = {
        "eager": _posterior(DiagonalGaussianDistribution, diffusers_loss),
        "compile": compiled(_posterior(DiagonalGaussianDistribution, diffusers_loss)),
        "fused": _posterior(DiagonalGaussian, fused_loss),
        "fused+compile": compiled(_posterior(DiagonalGaussian, fused_loss)),
    }
    cases = []
    for b, h, w in shapes:

        def make(b=b, h=h, w=w):
            moments = torch.randn(b, 8, h, w, device=device)
            moments[:, 4:].mul_(0.1)
            x = torch.rand(b, 3, 8 * h, 8 * w, device=device) * 2 - 1
            x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_()
            return moments.requires_grad_(), x_hat, x

        size = f"{b}x8x{h}x{w} + {b}x3x{8 * h}x{8 * w}"
        cases += posterior_loss_cases("autoencoder_kl_posterior", methods, make, b * 4 * h * w, b * 3 * 64 * h * w, size)
    return cases


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        step = _step_cases(device, "SD VAE", SD_VAE, batch=8, image_size=256)
        shapes = [(8, 32, 32)] if quick else [(8, 32, 32), (16, 64, 64), (64, 64, 64)]
    else:
        step = _step_cases(device, "small VAE", SMALL_VAE, batch=8, image_size=64)
        shapes = [(8, 32, 32)] if quick else [(8, 32, 32), (16, 64, 64)]
    return step + _posterior_cases(device, shapes)


def pytest_generate_tests(metafunc):
    if "autoencoder_kl_case" in metafunc.fixturenames:
        selected = cases(DEVICE, quick=not metafunc.config.getoption("--benchmark"))
        metafunc.parametrize("autoencoder_kl_case", selected, ids=[c.id for c in selected])


def test_autoencoder_kl(autoencoder_kl_case, run_case):
    run_case(autoencoder_kl_case)
