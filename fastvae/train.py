"""`fastvae train`: the whole training run in one function, read top to bottom.

config -> data -> model -> optimizer -> resume -> the loop, with logging every --log-every steps
and evaluation, PNG grids and a checkpoint every --every steps and at the end.

One process:       fastvae train --steps 500 --out runs/shapes
Several (DDP):     torchrun --nproc_per_node 2 -m fastvae train --steps 500 --out runs/shapes

--batch-size is the global batch; under torchrun each rank takes its contiguous part of every
batch, BatchNorm and the free-bits KL are computed over the global batch, and each image gets
the same noise, so the run follows the single-process one to float rounding.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from fastvae import checkpoint, data, ops
from fastvae._checks import LOSS_REDUCTIONS, RECONS
from fastvae._files import TEMPORARY_SUFFIX, HeldError, hold
from fastvae.images import save_grid, side_by_side
from fastvae.model import VAE

try:  # optional: TensorBoard events beside metrics.jsonl when tensorboard is installed
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None

CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
# Held by the run (rank 0 under torchrun) for its whole life; left in place after it, unlocked.
LOCK_NAME = ".fastvae.lock"
# Every file a run writes into --out, by name (and the temporaries a kill mid-write leaves):
# what --overwrite deletes, so that nothing else in the folder is ever touched.
RUN_FILES = re.compile(
    rf"({re.escape(CHECKPOINT_NAME)}|{re.escape(METRICS_NAME)}|"
    r"(reconstructions|samples|interpolations)_\d{6,}\.png|events\.out\.tfevents\..+)"
    rf"({TEMPORARY_SUFFIX.pattern})?"
)
BETA_SCHEDULES = ("constant", "linear", "cyclical")
DEFAULT_STEPS = 400
# What a resumed run must share with the checkpoint's: the data, its order and the objective.
# The length (--steps, --epochs), the logging, the device, the backend, --amp and --compile may change.
SAME_RUN_OPTIONS = (
    "data", "train_size", "eval_size", "batch_size", "seed", "lr", "beta", "beta_schedule", "beta_period",
    "free_bits", "reduction", "recon_reduction", "kl_reduction",
)
# Memory a training run needs per float32 parameter: the weight, its gradient and Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 16
# An epoch's order of the built-in shapes: numpy's permutation (8 bytes an index), then a Python
# list of it (8 bytes a pointer and 32 an int).
BYTES_PER_SHAPES_INDEX = 48
# Each evaluation goes through every held-out image, showing no progress: 2**20 of them take
# minutes on a GPU and hours on a CPU, and more is a typo.
MAX_EVAL_SIZE = 2**20
# Float32 copies of each image that a grid of decoded images holds at once: the batch, its copies
# on the way to 8-bit pixels (clamped, scaled, rounded) and the decoder's feature maps, which at
# the default widths are as large again.
IMAGE_COPIES = 8
# --compile's choices: torch.compile's modes, and off. reduce-overhead and max-autotune replay the
# step from CUDA graphs on a GPU.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
# The training set is kept whole on a GPU, and batches gathered there, when it takes at most this
# fraction of the device's free memory; the rest is left to the model, its activations and Adam.
DATA_ON_DEVICE_FRACTION = 0.25
# A latent dimension is active when its posterior mean varies over the data more than this
# (Burda et al., 2016); the count falling towards 0 is posterior collapse.
ACTIVE_UNIT_THRESHOLD = 0.01


class ConfigError(ValueError):
    """Options that cannot make a run (bad sizes, a device or backend that is not there)."""


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class RankZeroFailed(RuntimeError):
    """Under DDP, rank 0, the one that writes the run's files, could not (it says why): the other
    ranks stop with it rather than in their next collective."""


class Stopped(Exception):
    """A signal stopped the run after a checkpoint; the process should exit with 128 + ``signum``,
    the status of a process the signal killed, so that a scheduler sees what it expects."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _hidden_dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 32,64,128, got {text!r}") from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"channel counts must be positive, got {text!r}")
    return dims


def number_at_least(kind: type, low: float, *, strict: bool = False, below: tuple[float, str] | None = None):
    """An argparse type: a finite ``kind`` (int or float) of at least ``low`` (above it if ``strict``)
    and, with ``below=(limit, its name)``, under ``limit``."""
    bound = f"{'>' if strict else '>='} {low}" + (f" and < {below[1]}" if below else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low) or (below and value >= below[0]):
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} {bound}, got {text!r}")
        return value

    return parse


def _folder(text: str) -> str:
    # Path("") is the current folder: a run would scatter its files among whatever is there.
    if not text:
        raise argparse.ArgumentTypeError('expected a folder, got ""; name one, such as runs/vae (or . for this one)')
    return text


positive_int = number_at_least(int, 1)
non_negative_int = number_at_least(int, 0)
non_negative_float = number_at_least(float, 0)
# torch.manual_seed and torch.Generator take seeds up to 2**64 - 1.
seed_int = number_at_least(int, 0, below=(2**64, "2**64"))


def resolve_device(name: str | None) -> torch.device:
    """The device named by --device; by default CUDA when there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ConfigError(f"--device {name}: there {'is' if count == 1 else 'are'} {count} CUDA device(s) here, "
                          f"cuda:0 to cuda:{count - 1}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device


def memory_bytes(device: torch.device) -> float:
    """The memory of ``device``: the GPU's, or the machine's RAM (unbounded where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return math.inf


def check_fits(what: str, needed: float, device: torch.device) -> None:
    """Raise ConfigError when ``needed`` bytes exceed the memory of ``device``, before anything is
    allocated: ``what`` names the option, its value and what it makes."""
    available = memory_bytes(device)
    if needed > available:
        raise ConfigError(
            f"{what} would take about {needed / 2**30:.3g} GiB, more than the {available / 2**30:.3g} GiB of memory "
            f"on {device}"
        )


def image_bytes(images: int, image_size: int) -> int:
    """Bytes of ``images`` float32 RGB images of ``image_size``, as the model takes them."""
    return images * 3 * image_size**2 * 4


def check_images_fit(option: str, value: int, images: int, image_size: int, device: torch.device) -> None:
    """``option value`` makes a grid of ``images`` decoded images of ``image_size``: refuse it if they cannot fit."""
    check_fits(f"{option} {value}: a grid of {images} images of {image_size}x{image_size}",
               image_bytes(images, image_size) * IMAGE_COPIES, device)


def check_sizes_fit(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse sizes whose model, data order or evaluation cannot fit, naming the options."""
    with torch.device("meta"):  # the parameters are counted, not allocated
        model = VAE(3, args.image_size, args.latent_dim, args.hidden_dims)
    params = sum(p.numel() for p in model.parameters())
    check_fits(
        f"--latent-dim {args.latent_dim} and --hidden-dims {','.join(map(str, args.hidden_dims))} at --image-size "
        f"{args.image_size}: a model of {params:.3g} parameters and its training state",
        params * TRAINING_BYTES_PER_PARAMETER, device,
    )
    if args.data is None:  # a folder's order is as long as the folder
        check_fits(f"--train-size {args.train_size}: the order of an epoch of that many shapes",
                   args.train_size * BYTES_PER_SHAPES_INDEX, torch.device("cpu"))
    if args.eval_size > MAX_EVAL_SIZE:
        raise ConfigError(f"--eval-size {args.eval_size}: every evaluation would go through that many held-out "
                          f"images; at most {MAX_EVAL_SIZE} (2**20)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train the conv VAE. The defaults (built-in shapes at 64x64, hidden dims 32,64,128,256, "
        "latent 32, batch 64, 400 steps) take a few minutes on a 2-core CPU; on a GPU, raise "
        "--hidden-dims, --latent-dim, --batch-size and --steps."
    )
    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="DIR",
                       help="folder of images (searched recursively); default: built-in shapes")
    group.add_argument("--image-size", type=int, default=64,
                       help=f"power of two from 16 to {data.MAX_IMAGE_SIZE} (default: 64)")
    group.add_argument("--train-size", type=positive_int, default=20000,
                       help="shapes images to train on (default: 20000)")
    group.add_argument("--eval-size", type=positive_int, default=512,
                       help=f"held-out images, at most {MAX_EVAL_SIZE}; of --data, at most this many and a tenth "
                            "of the folder (default: 512)")
    group.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes (default: 0)")
    group.add_argument("--allow-changed-data", action="store_true",
                       help="with --resume: go on although images of --data were added, removed or changed "
                            "since the checkpoint (refused by default)")

    group = parser.add_argument_group("model")
    group.add_argument("--latent-dim", type=positive_int, default=32, help="(default: 32)")
    group.add_argument("--hidden-dims", type=_hidden_dims, default=(32, 64, 128, 256),
                       help="encoder channels per block, comma-separated (default: 32,64,128,256)")
    group.add_argument("--backend", choices=ops.BACKENDS, default="auto", help="fastvae.ops backend (default: auto)")

    group = parser.add_argument_group("optimisation")
    length = group.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help=f"optimizer steps (default: {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=positive_int, help="passes over the training set, instead of --steps")
    group.add_argument("--batch-size", type=positive_int, default=64, help="global batch size (default: 64)")
    group.add_argument("--lr", type=number_at_least(float, 0, strict=True), default=1e-3,
                       help="Adam learning rate (default: 1e-3)")
    group.add_argument("--beta", type=non_negative_float, default=1.0, help="weight of the KL term (default: 1)")
    group.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default="constant",
                       help="constant; linear: warm up from 0 over --beta-period steps; "
                            "cyclical: warm up over the first half of every --beta-period steps (default: constant)")
    group.add_argument("--beta-period", type=positive_int,
                       help="steps of the linear warm-up or of one cycle (default: a quarter of the run)")
    group.add_argument("--free-bits", type=non_negative_float, default=0.0,
                       help="floor on the batch-mean KL of each latent dimension, in nats (default: 0, off)")
    group.add_argument("--reduction", choices=("sum", "batchmean", "mean"), default="batchmean",
                       help="how both loss terms are reduced over the batch (default: batchmean, per image)")
    group.add_argument("--recon", choices=RECONS, default="mse",
                       help="reconstruction term; bce_logits drops the decoder's Sigmoid (default: mse)")
    group.add_argument("--recon-reduction", choices=LOSS_REDUCTIONS,
                       help="reduction of the reconstruction term alone (default: --reduction)")
    group.add_argument("--kl-reduction", choices=LOSS_REDUCTIONS,
                       help="reduction of the KL term alone (default: --reduction)")
    group.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                       help="autocast dtype; fp16 needs CUDA and uses a GradScaler (default: off)")
    group.add_argument("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES,
                       help="torch.compile the training step in this mode; --compile alone is default "
                            "(default: off)")

    group = parser.add_argument_group("run")
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    group.add_argument("--seed", type=seed_int, default=0,
                       help="seeds the model, the data and the noise (default: 0)")
    group.add_argument("--out", type=_folder, default="runs/vae",
                       help="folder for checkpoint, metrics and grids (default: runs/vae)")
    start = group.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help=f"continue from --out/{CHECKPOINT_NAME} if there is one")
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh in an --out that holds a run, deleting the files it wrote there")
    group.add_argument("--every", type=positive_int, default=100,
                       help="steps between evaluations, PNG grids and checkpoints (default: 100)")
    group.add_argument("--log-every", type=positive_int, default=10,
                       help="steps between NaN checks and progress updates; every step is logged (default: 10)")


def beta_at(step: int, beta: float, schedule: str, period: int) -> float:
    """The KL weight for the step after ``step`` steps have been taken."""
    if schedule == "linear":
        return beta * min(1.0, step / period)
    if schedule == "cyclical":  # Fu et al., 2019: ramp over the first half of each cycle, then hold
        return beta * min(1.0, 2 * (step % period) / period)
    return beta


class ShardedForward(nn.Module):
    """The VAE's training forward on one rank's part of a global batch.

    The noise is drawn for the whole global batch, with this rank's latents padded by zeros to
    their place in it, and then sliced: each image gets the eps it would get in one process.
    """

    def __init__(self, vae: VAE, rank: int, world_size: int) -> None:
        super().__init__()
        self.vae, self.rank, self.world_size = vae, rank, world_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.vae.encode(x)
        n = mu.shape[0]
        before, after = self.rank * n, (self.world_size - 1 - self.rank) * n
        z = ops.reparameterize(
            F.pad(mu, (0, 0, before, after)), F.pad(logvar, (0, 0, before, after)), backend=self.vae.backend
        )
        return self.vae.decode(z[before : before + n]), mu, logvar


class _AllReduceSum(torch.autograd.Function):
    # Each rank's output is the sum of every rank's input, so each input's gradient is the sum of
    # every rank's output gradient: an all-reduce both ways. (torch.distributed.nn's is deprecated,
    # and the functional collectives that replace it have no autograd for all_reduce.)
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks, differentiable."""
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batch of every rank, for gloo.

    torch's SyncBatchNorm does this for GPU tensors only. The all-reduces are differentiable,
    so the gradient is that of BatchNorm over the global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = all_reduce_sum(x.sum((0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = all_reduce_sum(centred.square().sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            # momentum None means a cumulative average, as in BatchNorm2d
            factor = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
            self.running_mean.lerp_(mean, factor)
            self.running_var.lerp_(var * (count / (count - 1)), factor)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap each BatchNorm2d for one over the global batch (same parameters and state dict)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum).to(device)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            global_batchnorm(child, device)
    return module


def free_bits_kl(mu, logvar, *, floor, reduction, global_batch, distributed, backend) -> torch.Tensor:
    """The KL term with each latent dimension's batch-mean KL raised to at least ``floor``
    (Kingma et al., 2016), reduced like the reference KL; computed over the global batch."""
    per_dim = ops.kl_divergence(mu, logvar, reduction="none", backend=backend).sum(0)
    if distributed:
        per_dim = all_reduce_sum(per_dim)
    total = (per_dim / global_batch).clamp(min=floor).sum()
    if reduction == "sum":
        return total * global_batch
    if reduction == "mean":
        return total / mu.shape[1]
    return total


@torch.no_grad()
def evaluate(model: VAE, loader: DataLoader, device: torch.device, autocast, backend: str) -> dict:
    """Per-image negative ELBO (beta = 1, one sample of z, fixed seeds) on the held-out set, and
    the number of active latent units."""
    model.eval()
    recon = kl = 0.0
    means = []
    for i, x in enumerate(loader):
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


def _ignore_sigterm(worker_id: int) -> None:
    # A scheduler may signal the whole process group (Slurm's scancel does). A DataLoader worker
    # that died of it would end the run with an error before its checkpoint; the run stops its
    # workers itself, after the checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run(args: argparse.Namespace) -> int:
    # ---- config -------------------------------------------------------------------------------
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1  # set by torchrun
    rank = int(os.environ["RANK"]) if distributed else 0
    world_size = int(os.environ["WORLD_SIZE"]) if distributed else 1
    master = rank == 0
    device = resolve_device(args.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.batch_size % world_size:
        raise ConfigError(f"--batch-size {args.batch_size} does not split evenly across {world_size} processes")
    try:
        data.check_image_size(args.image_size)
    except ValueError as exc:
        raise ConfigError(f"--image-size: {exc}") from None
    if args.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    try:
        ops.resolve_backend("reparameterize", device, args.backend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_sizes_fit(args, device)
    # The loss has no Triton kernel; with --backend triton it goes to the best other backend.
    loss_backend = "auto" if args.backend == "triton" else args.backend
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    # Made afresh for each use: torch.compile traces an autocast entered inside the step, not one made outside it.
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT_NAME
    # Checked on every rank, so that all of them stop; held by rank 0, the only one that writes
    # there. A refused rank 0 leaves the others waiting for it below, until torchrun stops them.
    lock = prepare_out(out, resume=args.resume, overwrite=args.overwrite, lock=master)
    torch.manual_seed(args.seed)

    metrics = writer = progress = None
    terminated: list[int] = []  # SIGTERM's number, once it comes
    rank_zero_failed = False  # under DDP, rank 0 could not write the run's files, and every rank knows it
    sigterm_handler = None
    try:
        if distributed:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # ---- data -----------------------------------------------------------------------------
        train_set, eval_set = data.train_eval_split(
            args.data, args.image_size, seed=args.seed, train_size=args.train_size, eval_size=args.eval_size
        )
        # The shapes are fixed by the options the resume check compares; a folder can change under the same name.
        data_record = data.ImageFolder(args.data, args.image_size).fingerprint() if args.data else None
        batches = data.EpochBatches(len(train_set), args.batch_size, seed=args.seed, rank=rank, world_size=world_size)
        total_steps = args.steps or (args.epochs or 0) * batches.per_epoch or DEFAULT_STEPS
        # Evaluation has its own generator (the loader draws a seed for its workers), so that it
        # leaves torch's global one, the training noise, alone: under DDP only rank 0 evaluates.
        eval_loader = DataLoader(
            eval_set, batch_size=args.batch_size, num_workers=args.workers, worker_init_fn=_ignore_sigterm,
            generator=torch.Generator().manual_seed(args.seed),
        )
        grid_images = torch.stack([eval_set[i] for i in range(min(16, len(eval_set)))]).to(device)

        # ---- model ----------------------------------------------------------------------------
        model = VAE(
            3, args.image_size, args.latent_dim, args.hidden_dims, backend=args.backend, recon=args.recon
        ).to(device)
        if distributed:
            model = global_batchnorm(model, device)  # before the optimizer: it may make new parameters

        # ---- optimizer ------------------------------------------------------------------------
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

        # ---- resume ---------------------------------------------------------------------------
        step, saved_args = 0, {}
        if args.resume and ckpt_path.exists():
            ckpt = checkpoint.load(ckpt_path, resumable=True)
            checkpoint.check_config(ckpt["config"], model.config, ckpt_path)
            saved_args = ckpt.get("args", {})
            check_same_run(saved_args, args, ckpt_path)
            if args.data is not None and not args.allow_changed_data:
                check_same_data(ckpt, data_record, args.data, ckpt_path, say=master)
            checkpoint.restore(ckpt, ckpt_path, model, optimizer, scaler)
            step = ckpt["step"]
        elif args.resume and master:
            print(f"no checkpoint in {out}; starting from scratch")
        batches.start = step  # the data order depends on (seed, epoch) only, so the step fixes the position
        # The default period follows the run's length, which a resume may extend: it keeps the first one's.
        beta_period = args.beta_period or saved_args.get("beta_period") or max(1, total_steps // 4)
        on_device = data_fits_on(device, len(train_set), args.image_size)
        if on_device:
            images = data.stack_on(train_set, device, workers=args.workers)
            batch_iter = (images.index_select(0, indices) for indices in batches.on_device(device))
        else:
            loader = DataLoader(
                train_set,
                batch_sampler=batches,
                num_workers=args.workers,
                worker_init_fn=_ignore_sigterm,
                pin_memory=device.type == "cuda",
                # its own generator, so that starting the iterator leaves torch's global RNG alone
                generator=torch.Generator().manual_seed(args.seed),
            )
            batch_iter = (x.to(device, non_blocking=True) for x in loader)
        net: nn.Module = model
        if distributed:
            device_ids = [device.index] if device.type == "cuda" else None
            net = DistributedDataParallel(ShardedForward(model, rank, world_size), device_ids=device_ids)
        # DDP averages gradients over ranks; a term reduced by "sum" globally is the sum of the ranks'.
        recon_scale, kl_scale = (
            world_size if (term_reduction or args.reduction) == "sum" else 1
            for term_reduction in (args.recon_reduction, args.kl_reduction)
        )

        def train_step(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
            """One optimizer step; returns the step's (objective, recon, kl), float32."""
            with autocast():
                x_hat, mu, logvar = net(x)
                # beta, a tensor, weighs the KL here rather than in the op, whose beta is a float:
                # a changing --beta-schedule must not recompile a compiled step.
                _, recon, kl = ops.vae_loss(
                    x_hat, x, mu, logvar, reduction=args.reduction, recon=args.recon,
                    recon_reduction=args.recon_reduction, kl_reduction=args.kl_reduction, backend=loss_backend,
                )
                if args.free_bits > 0:
                    kl_term = free_bits_kl(  # already global, so not scaled
                        mu, logvar, floor=args.free_bits, reduction=args.kl_reduction or args.reduction,
                        global_batch=args.batch_size, distributed=distributed, backend=loss_backend,
                    )
                else:
                    kl_term = kl_scale * kl
                objective = recon_scale * recon + beta * kl_term
            optimizer.zero_grad(set_to_none=True)
            if args.amp == "fp16":
                scaler.scale(objective).backward()
                scaler.step(optimizer)
                scaler.update()
            else:  # the same steps: torch.compile does not trace the scaler, so would not compile Adam inside it
                objective.backward()
                optimizer.step()
            # Averaged over ranks, these are the global loss and its parts.
            return torch.stack([objective, recon_scale * recon, kl_scale * kl]).detach().float()

        step_fn = compile_step(train_step, args.compile)
        beta_tensor = torch.empty((), device=device)

        if master:
            if args.overwrite:  # before training, so that a later --resume cannot continue the old run
                remove_run(out)
            metrics = _open_metrics(out / METRICS_NAME, step)
            writer = SummaryWriter(str(out)) if SummaryWriter is not None else None
            params = sum(p.numel() for p in model.parameters())
            print(
                f"training on {device} x{world_size}: {args.data or 'built-in shapes'} at "
                f"{args.image_size}x{args.image_size} ({len(train_set)} train / {len(eval_set)} held out), "
                f"latent {args.latent_dim}, hidden {','.join(map(str, args.hidden_dims))} "
                f"({params / 1e6:.2f}M params), batch {args.batch_size}, steps {step} -> {total_steps}, into {out}"
                f"{'; data kept on ' + str(device) if on_device else ''}"
                f"{'; compiled, ' + args.compile if args.compile != 'off' else ''}"
            )
        if step >= total_steps:
            if master:
                print(f"nothing to do: {ckpt_path} is at step {step} of {total_steps}")
            return 0

        # ---- the loop -------------------------------------------------------------------------
        # Schedulers send SIGTERM some time before they kill: the run stops after its step with
        # a checkpoint. (SIGINT, Ctrl-C, stops it at once, from the last checkpoint.)
        sigterm_handler = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
        model.train()
        history: list[torch.Tensor] = []  # (loss, recon, kl) of each step since the last check
        betas: list[float] = []
        progress = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
        last_check = (step, time.perf_counter())
        while step < total_steps:
            beta = beta_at(step, args.beta, args.beta_schedule, beta_period)
            history.append(step_fn(next(batch_iter), beta_tensor.fill_(beta)))
            step += 1
            betas.append(beta)

            evaluating = step % args.every == 0 or step == total_steps
            # Under DDP the ranks check together, so SIGTERM waits for the next check there.
            if step % args.log_every and not evaluating and (distributed or not terminated):
                continue
            # Losses reach the host only here, not every step, so the GPU is not synced each step.
            # A checkpoint is written only after this check, so it never holds a diverged model.
            values = torch.stack(history)
            if distributed:
                dist.all_reduce(values)
                values /= world_size
            first, rows = step - len(history) + 1, values.tolist()
            diverged = next((i for i, row in enumerate(rows) if not all(map(math.isfinite, row))), None)
            if master:  # the steps before a non-finite one are logged, so the history shows how it got there
                for i, ((l, r, k), b) in enumerate(zip(rows[:diverged], betas)):
                    _log(metrics, writer, {"step": first + i, "loss": l, "recon": r, "kl": k, "beta": b})
            if diverged is not None:
                raise DivergedError(
                    f"loss is {rows[diverged][0]} at step {first + diverged}; stopped ({_kept(ckpt_path)})"
                )
            stopping = bool(terminated)
            if distributed:  # torchrun sends SIGTERM to every rank, but not at one instant
                flag = torch.tensor(float(stopping), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag)
            stopping = stopping and step < total_steps  # on the last step, the run ends as usual
            if master:
                images_per_s = (step - last_check[0]) * args.batch_size / (time.perf_counter() - last_check[1])
                progress.update(step - progress.n)
                progress.set_postfix(
                    loss=f"{l:.4g}", recon=f"{r:.4g}", kl=f"{k:.4g}", beta=f"{b:.3g}", img_s=f"{images_per_s:.0f}"
                )
            history.clear()
            betas.clear()
            if evaluating or stopping:
                # A finite loss does not make finite weights: the step's update can overflow them
                # (a huge --beta). DDP keeps every rank's weights equal, so all ranks stop here.
                broken = non_finite_state(model, optimizer)
                if broken:
                    raise DivergedError(
                        f"{broken[0]} is not finite after step {step}; stopped ({_kept(ckpt_path)})"
                    )
            if evaluating:
                if master:
                    results = evaluate(model, eval_loader, device, autocast, loss_backend)
                    _log(metrics, writer, {"step": step, **results})
                eval_loss = results["eval_loss"] if master else 0.0
                if distributed:  # only rank 0 evaluates: the others stop with it, not in their next collective
                    verdict = torch.tensor(eval_loss, dtype=torch.float64, device=device)
                    dist.broadcast(verdict, 0)
                    eval_loss = verdict.item()
                if not math.isfinite(eval_loss):
                    raise DivergedError(f"held-out loss is {eval_loss} at step {step}; stopped ({_kept(ckpt_path)})")
            write_error = None
            if (evaluating or stopping) and master:
                try:
                    if evaluating:
                        grids = write_grids(model, grid_images, out, step, args.seed)
                    if writer is not None:  # TensorBoard's events as far as the checkpoint, as metrics.jsonl's
                        writer.flush()
                    checkpoint.save(
                        {
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict(),
                            "step": step,
                            "config": model.config,
                            "rng": checkpoint.rng_state(),
                            "data": data_record,
                            "args": {
                                **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
                                "beta_period": beta_period,
                            },
                        },
                        ckpt_path,
                    )
                except Exception as exc:  # a full disk, say: under DDP the other ranks must hear of it
                    if not distributed:
                        raise
                    write_error = exc
            if distributed and (evaluating or stopping):
                failed = torch.tensor(float(write_error is not None), device=device)
                dist.broadcast(failed, 0)
                if failed.item():
                    rank_zero_failed = True
                    if master:
                        raise write_error
                    raise RankZeroFailed("rank 0 could not write the run's files (its line says why); stopped with it")
            if stopping:
                message = f"stopped by SIGTERM after step {step}, saved in {ckpt_path}; continue with --resume"
                raise Stopped(message, signal.SIGTERM)
            last_check = (step, time.perf_counter())  # evaluation time is not training speed
        progress.close()
        if master:
            print(
                f"done: step {step}; held-out loss {results['eval_loss']:.4g} (recon {results['eval_recon']:.4g}, "
                f"kl {results['eval_kl']:.4g}), {results['active_units']}/{args.latent_dim} active latent units; "
                f"wrote {ckpt_path}, {', '.join(str(p) for p in grids)}"
            )
        return 0
    finally:
        if sigterm_handler is not None:
            signal.signal(signal.SIGTERM, sigterm_handler)
        for resource in (progress, metrics, writer, lock):
            if resource is not None:
                resource.close()
        if distributed and dist.is_initialized():
            # DDP's reducer holds the process group. Left to be freed with this frame, after the
            # group is destroyed, it hung gloo's teardown on torch 2.11 (one run in four, here).
            net = None
            # Where every rank leaves here together (done, diverged, stopped or rank 0's write
            # failed, all decided in a collective), none tears its connections down while another
            # still works: a rank that did so while rank 0 wrote its grids died in gloo's teardown
            # (SIGABRT, once in CI). A rank leaving alone (its own error) must not wait for the others.
            leaving = sys.exc_info()[1]
            if leaving is None or isinstance(leaving, (DivergedError, Stopped)) or rank_zero_failed:
                dist.barrier()
            dist.destroy_process_group()


def compile_step(step, mode: str):
    """``step`` under torch.compile in ``mode`` (--compile), or itself when "off".

    Random ops run as in eager (inductor's fallback_random), so a compiled run draws the noise
    of the eager one and either can resume the other's checkpoint. The model is not wrapped, so
    its state_dict keys stay those of an eager run.
    """
    if mode == "off":
        return step
    options = {**torch._inductor.list_mode_options(mode), "fallback_random": True}
    compiled = torch.compile(step, dynamic=False, options=options)

    def run(*inputs):
        # Each call is one whole iteration to CUDA graph trees, which then reuse its memory on the
        # next: the losses, kept until the next check, are copied out.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*inputs).clone()

    return run


def data_fits_on(device: torch.device, num_images: int, image_size: int) -> bool:
    """Whether the training set stays on ``device`` whole: a GPU with DATA_ON_DEVICE_FRACTION of
    its free memory for the set's float32 RGB images. A CPU reads it through a DataLoader."""
    if device.type != "cuda":
        return False
    return image_bytes(num_images, image_size) <= DATA_ON_DEVICE_FRACTION * torch.cuda.mem_get_info(device)[0]


def prepare_out(out: Path, *, resume: bool, overwrite: bool, lock: bool):
    """Make the --out folder and, with ``lock``, hold it for the run (until the returned file is
    closed, or the process dies), or raise ConfigError saying why the run cannot write there:
    before anything is trained, and before a run already there is touched without --resume or
    --overwrite, or while another process holds it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there ({exc.strerror})") from None
    held = None
    if lock:
        try:
            held = hold(out / LOCK_NAME)
        except HeldError as exc:
            raise ConfigError(
                f"--out {out} is in use by another run ({exc}, which holds {out / LOCK_NAME}); "
                "wait for it to end or stop it"
            ) from None
        if held is None:
            print(f"warning: cannot lock --out {out} on this platform (no fcntl); "
                  "start no other run on it until this one ends", file=sys.stderr)
    try:
        for name in (CHECKPOINT_NAME, METRICS_NAME):
            if (out / name).exists() and not (out / name).is_file():
                raise ConfigError(f"{out / name} is not a file; move it out of the way")
        previous = [name for name in (CHECKPOINT_NAME, METRICS_NAME) if (out / name).exists()]
        if previous and not (resume or overwrite):
            raise ConfigError(
                f"--out {out} already holds a run ({', '.join(previous)}): "
                "pass --resume to continue it or --overwrite to replace it"
            )
    except ConfigError:
        if held is not None:
            held.close()
        raise
    return held


def remove_run(out: Path) -> None:
    """Delete the files that a run wrote into ``out`` (RUN_FILES), and nothing else."""
    for path in out.iterdir():
        if RUN_FILES.fullmatch(path.name) and path.is_file():
            path.unlink()


def check_same_run(saved: dict, args: argparse.Namespace, path: Path) -> None:
    """Refuse to resume with other data or another objective: the checkpoint's optimizer state,
    data order and noise follow them. --beta-period, left out, takes the saved one."""
    differences = []
    for key in SAME_RUN_OPTIONS:
        there, here = saved.get(key), getattr(args, key)
        if key not in saved or (key == "beta_period" and here is None):
            continue
        if key == "data" and there is not None and here is not None:
            there, here = (str(Path(p).resolve()) for p in (there, here))
        if there != here:
            differences.append(f"--{key.replace('_', '-')} {there} there but {here} here")
    if differences:
        raise ConfigError(f"{path} is from another run: {'; '.join(differences)} (resume with the same options)")


def check_same_data(ckpt: dict, current: dict, folder: str, path: Path, *, say: bool) -> None:
    """Refuse to resume on a --data folder whose fingerprint is not the one the checkpoint trained
    on. A checkpoint older than the record is let through, saying so when ``say``."""
    if "data" not in ckpt:
        if say:
            print(f"{path} does not record the images it trained on (an older fastvae wrote it): "
                  f"--data {folder} is not checked against it")
        return
    if ckpt["data"] == current:
        return
    then = ckpt["data"].get("images") if isinstance(ckpt["data"], dict) else None
    if then is not None and then != current["images"]:
        change = f"it held {then} images then and {current['images']} now"
    else:
        change = f"images were added, removed, rewritten or touched ({current['images']} now)"
    raise ConfigError(
        f"{path} trained on other images: since then, in --data {folder}, {change}; "
        "pass --allow-changed-data to resume on them anyway"
    )


def non_finite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the parameters, buffers and optimizer state (Adam's moments can overflow while
    the weights stay finite) that hold a NaN or an infinity."""
    tensors = dict(model.state_dict())
    names = {param: name for name, param in model.named_parameters()}
    for param, state in optimizer.state.items():
        tensors.update({f"Adam's {key} of {names[param]}": t for key, t in state.items() if torch.is_tensor(t)})
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]


def _kept(ckpt_path: Path) -> str:
    return f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint yet"


def _open_metrics(path: Path, step: int):
    """metrics.jsonl for appending, without the lines that an interrupted run logged after its last
    checkpoint at ``step`` (a fresh run, step 0, starts it empty).

    One pass, line by line, finds where the records the checkpoint covers end, and the file is cut
    there in place: memory stays constant however long the history, and one truncate leaves, if
    killed, the whole history or the kept part. Lines that are not records of ours (JSON added by
    hand) after the last kept record are cut with the rest. A line that is not JSON is tolerated
    past the last kept record only, where a kill mid-write leaves a torn one; before it, it is
    damage that a resumed run would build on, and ConfigError names its line.
    """
    with open(path, "a+b") as f:
        f.seek(0)
        end, broken = 0, None  # the byte offset after the last kept record; the first line not JSON
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:  # not JSON, or not UTF-8
                broken = broken or number
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            if record["step"] > step:
                break
            if broken is not None:
                raise ConfigError(
                    f"{path} line {broken} is not a JSON record, but records up to the checkpoint's step {step} "
                    "follow it; mend or delete that line, then resume again"
                )
            end = f.tell()
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    return open(path, "a", buffering=1)


def _log(metrics, writer, record: dict) -> None:
    # NaN and Infinity are not JSON, and strict readers refuse them: each is null, named with its value.
    non_finite = {key: str(v) for key, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    line = {**record, **dict.fromkeys(non_finite), "non_finite": non_finite} if non_finite else record
    metrics.write(json.dumps(line, allow_nan=False) + "\n")
    if writer is not None:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, record["step"])
