"""`fastvae train`'s options: their parsing, the checks that refuse options that cannot make a run,
and the memory costing that refuses sizes that cannot fit, all before anything is allocated."""

from __future__ import annotations

import argparse
import math
import os

import torch

from fastvae import data, ops
from fastvae._checks import LOSS_REDUCTIONS, RECONS
from fastvae._workers import usable_cpus
from fastvae.model import VAE
from fastvae.training.errors import ConfigError
from fastvae.training.run_folder import CHECKPOINT_NAME

BETA_SCHEDULES = ("constant", "linear", "cyclical")
DEFAULT_STEPS = 400
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
# The modes whose step --cuda-graph can capture: the others replay CUDA graphs of their own, which
# cannot be captured inside another.
GRAPHABLE_COMPILE_MODES = ("off", "default")
# Channel counts and the latent dimension stay under this: far wider than any conv VAE (Stable
# Diffusion's has 512 channels), yet narrow enough that no tensor of the widest model at the
# largest image size has more elements than torch counts in an int64, so the memory check, not
# torch's overflow, refuses what is too wide.
WIDTH_LIMIT = (2**16, "2**16")
# Counts (steps, images, batch sizes) reach torch and numpy as int64s.
COUNT_LIMIT = (2**63, "2**63")
# --log-every stays under this: the losses of the steps between two checks wait on the device until
# the check, a tensor (an allocation) a step, or with --cuda-graph a row each of a ring made at the
# first step; a typo such as 4000000000000 would ask for terabytes there.
LOG_EVERY_LIMIT = (2**16, "2**16")


def _hidden_dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 32,64,128, got {text!r}") from None
    if any(not 1 <= d < WIDTH_LIMIT[0] for d in dims):
        raise argparse.ArgumentTypeError(f"expected channel counts >= 1 and < {WIDTH_LIMIT[1]}, got {text!r}")
    return dims


def _workers(text: str) -> int:
    # More workers than CPUs only compete for them, each a copy of the process: a typo such as
    # 100000 would fork until the machine stalls.
    most = usable_cpus()
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= most:
        raise argparse.ArgumentTypeError(f"expected int >= 0 and <= {most} (the CPUs this process may use), "
                                         f"got {text!r}")
    return value


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


positive_int = number_at_least(int, 1, below=COUNT_LIMIT)
width_int = number_at_least(int, 1, below=WIDTH_LIMIT)
non_negative_float = number_at_least(float, 0)
# torch.manual_seed and torch.Generator take seeds up to 2**64 - 1.
seed_int = number_at_least(int, 0, below=(2**64, "2**64"))


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
    group.add_argument("--workers", type=_workers, default=0,
                       help=f"DataLoader worker processes, at most the CPUs this process may use ({usable_cpus()} "
                            "here); each rank under torchrun starts its own (default: 0)")
    group.add_argument("--allow-changed-data", action="store_true",
                       help="with --resume: go on although images of --data were added, removed or changed "
                            "since the checkpoint (refused by default)")

    group = parser.add_argument_group("model")
    group.add_argument("--latent-dim", type=width_int, default=32, help=f"under {WIDTH_LIMIT[1]} (default: 32)")
    group.add_argument("--hidden-dims", type=_hidden_dims, default=(32, 64, 128, 256),
                       help=f"encoder channels per block, comma-separated, each under {WIDTH_LIMIT[1]} "
                            "(default: 32,64,128,256)")
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
                            "(default: off). It is three graphs, not one: the forward with the loss, Adam's "
                            "update and the stack of the losses, with Python between them at "
                            "Optimizer.zero_grad, which Dynamo does not trace, and at Tensor.backward, where "
                            "autograd runs the compiled backward; reduce-overhead and max-autotune replay each "
                            "from CUDA graphs. For one graph of the whole step, --cuda-graph")
    group.add_argument("--cuda-graph", action="store_true",
                       help="capture the whole step (the batch gathered from the training set kept on the GPU, "
                            "forward, loss, backward, Adam) into one CUDA graph after 3 warm-up steps and replay "
                            "it: one process on a GPU, --amp off or bf16, --compile off or default (the step "
                            "compiled inside the graph)")

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
    group.add_argument("--log-every", type=number_at_least(int, 1, below=LOG_EVERY_LIMIT), default=10,
                       help=f"steps between NaN checks and progress updates, under {LOG_EVERY_LIMIT[1]}: the losses "
                            "of the steps between two checks wait on the device until the check; every step is "
                            "logged (default: 10)")


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


def check_graphable(args: argparse.Namespace, device: torch.device, world_size: int) -> None:
    """Refuse --cuda-graph with what a replay cannot do, naming it. (The training set must also be
    kept on the GPU, which is known once it is read.)"""
    if args.compile not in GRAPHABLE_COMPILE_MODES:
        raise ConfigError(f"--cuda-graph with --compile {args.compile}: that mode replays CUDA graphs of its own, "
                          "which cannot be captured inside the step's; use --compile default")
    if args.amp == "fp16":
        raise ConfigError("--cuda-graph with --amp fp16: GradScaler decides on the host whether each step is "
                          "skipped, which a replay cannot; use --amp bf16, which needs no scaler")
    if world_size > 1:
        raise ConfigError(f"--cuda-graph runs in one process, not {world_size}: the graph would hold the "
                          "collectives of DDP; run without torchrun")
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graph needs a CUDA device, not {device}")


def check_run_options(args: argparse.Namespace, device: torch.device, world_size: int) -> None:
    """Refuse options that cannot make a run on ``device`` with ``world_size`` processes, naming them."""
    if args.batch_size % world_size:
        raise ConfigError(f"--batch-size {args.batch_size} does not split evenly across {world_size} processes")
    try:
        data.check_image_size(args.image_size)
    except ValueError as exc:
        raise ConfigError(f"--image-size: {exc}") from None
    if args.cuda_graph:
        check_graphable(args, device, world_size)
    if args.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    try:
        ops.resolve_backend("reparameterize", device, args.backend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_sizes_fit(args, device)
