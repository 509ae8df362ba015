"""Train diffusers' AutoencoderKL (the Stable Diffusion VAE) with fastvae's fused posterior.

The one line that matters is ``patch(vae)``: the model's ``encode`` then returns a
``fastvae.DiagonalGaussian``, whose ``sample`` and ``kl`` run on fastvae's kernels; the loss is
``fastvae.ops.vae_loss``, one fused pass.

    python examples/train_autoencoder_kl.py                  # built-in shapes, 32x32, a tiny model: CPU-sized
    python examples/train_autoencoder_kl.py --no-fastvae     # the same run on diffusers' own posterior
    python examples/train_autoencoder_kl.py --data ~/images --image-size 256 --device cuda \
        --block-out-channels 128,256,512,512 --batch-size 8 --steps 20000 --every 1000

The loss is diffusers' recipe for AutoencoderKL without its LPIPS and GAN terms: the
reconstruction error (L1 or MSE, mean over pixels) + kl_weight * the KL (summed over each
latent, mean over the batch). The run writes to --out: ``reconstructions_<step>.png`` (each
original beside its reconstruction, held-out images), ``metrics.jsonl`` (one line per step) and
the trained model (``save_pretrained``, loadable with ``AutoencoderKL.from_pretrained``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from fastvae import ops
from fastvae.data import EpochBatches, train_eval_split
from fastvae.images import save_grid, side_by_side
from fastvae.integrations.diffusers import patch

# ---- config -----------------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--data", help="a folder of images (searched recursively); default: built-in shapes")
parser.add_argument("--image-size", type=int, default=32)
parser.add_argument("--block-out-channels", default="16,32", help="one encoder/decoder block each; SD's is 128,256,512,512")
parser.add_argument("--layers-per-block", type=int, default=1, help="SD's is 2")
parser.add_argument("--norm-num-groups", type=int, default=8, help="SD's is 32")
parser.add_argument("--latent-channels", type=int, default=4)
parser.add_argument("--recon", choices=("l1", "mse"), default="l1")
parser.add_argument("--kl-weight", type=float, default=1e-6, help="diffusers' default")
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--every", type=int, default=100, help="write a grid every this many steps")
parser.add_argument("--train-size", type=int, default=2048, help="shapes images to train on (without --data)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--compile", action="store_true", help="torch.compile the training step's forward and loss")
parser.add_argument("--no-fastvae", action="store_true", help="train on diffusers' own posterior, to compare")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="runs/autoencoder_kl")
args = parser.parse_args()

from diffusers import AutoencoderKL  # noqa: E402  (after argparse, so --help is instant)

torch.manual_seed(args.seed)
device = torch.device(args.device)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

# ---- data: images in [-1, 1], diffusers' convention ------------------------------------------
train_set, eval_set = train_eval_split(args.data, args.image_size, seed=args.seed, train_size=args.train_size, eval_size=16)
batches = EpochBatches(len(train_set), args.batch_size, seed=args.seed)
loader = iter(DataLoader(train_set, batch_sampler=batches, num_workers=0))
eval_images = torch.stack([eval_set[i] for i in range(min(16, len(eval_set)))]).to(device) * 2 - 1

# ---- model ------------------------------------------------------------------------------------
block_out_channels = tuple(int(c) for c in args.block_out_channels.split(","))
vae = AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
    up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
    block_out_channels=block_out_channels,
    layers_per_block=args.layers_per_block,
    norm_num_groups=args.norm_num_groups,
    latent_channels=args.latent_channels,
    sample_size=args.image_size,
).to(device)
if not args.no_fastvae:
    patch(vae)
print(f"AutoencoderKL, {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, "
      f"{'fastvae' if not args.no_fastvae else 'diffusers'} posterior, on {device}")

# ---- optimizer --------------------------------------------------------------------------------
optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr)


def step_loss(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers' loss: the reconstruction error averaged over pixels + kl_weight x the batch mean
    of the per-sample KL; with fastvae, one fused pass over the images and the latents."""
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.sample()).sample
    if args.no_fastvae:
        recon = F.l1_loss(x_hat, x) if args.recon == "l1" else F.mse_loss(x_hat, x)
        kl = posterior.kl().mean()
        return recon + args.kl_weight * kl, recon, kl
    return ops.vae_loss(
        x_hat, x, posterior.mean, posterior.logvar, beta=args.kl_weight, recon=args.recon,
        recon_reduction="mean", kl_reduction="batchmean",
    )


loss_fn = torch.compile(step_loss) if args.compile else step_loss


@torch.no_grad()
def write_grid(step: int) -> None:
    vae.eval()
    reconstructions = vae(eval_images).sample  # the posterior mean, decoded
    vae.train()
    save_grid(side_by_side((eval_images + 1) / 2, (reconstructions + 1) / 2), out / f"reconstructions_{step:06d}.png", 8)


# ---- the loop ---------------------------------------------------------------------------------
vae.train()
with open(out / "metrics.jsonl", "w") as metrics, tqdm(range(1, args.steps + 1), desc="train") as bar:
    for step in bar:
        x = next(loader).to(device, non_blocking=True) * 2 - 1
        start = time.perf_counter()
        loss, recon, kl = loss_fn(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = {"step": step, "loss": loss.item(), "recon": recon.item(), "kl": kl.item()}
        metrics.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.1f}", img_s=f"{len(x) / (time.perf_counter() - start):.0f}")
        if step % args.every == 0 or step == args.steps:
            write_grid(step)

vae.save_pretrained(out / "vae")
print(f"final loss {record['loss']:.4f}; grids, metrics.jsonl and the model are in {out}")
