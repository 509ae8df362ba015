"""The ``fastvae`` command: train | sample | reconstruct | export | info | bench (also ``python -m fastvae``).

Each command is a pair ``add_arguments(parser)`` / ``run(args) -> int``. Only the chosen
command's module is imported, so ``fastvae sample`` does not pay for the benchmark's imports.
Mistakes of the user (bad options, a missing folder, an unusable checkpoint, an --out that
cannot be written, one that another run holds) end in one line on stderr and exit status 2; a
diverged run ends in one line and exit status 1; a run stopped by SIGTERM, after its checkpoint,
in one line (under torchrun, rank 0's) and exit status 143 (128 + 15, as if the signal had killed
it); Ctrl-C, at any moment, in one line and exit status 130, keeping the last whole checkpoint. A
checkpoint written before checkpoints carried a digest is used with one line on stderr,
``fastvae COMMAND: warning: ...``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

COMMANDS = {
    "train": "train the conv VAE on built-in shapes or a folder of images",
    "sample": "decode samples from the prior of a checkpoint into an image grid",
    "reconstruct": "write images beside their reconstructions by a checkpoint as an image grid",
    "export": "write a checkpoint's model as config.json and model.safetensors, for VAE.from_pretrained",
    "info": "show the versions, devices and the backend each op dispatches to",
    "bench": "time the fused ops against the reference",
}


IMAGE_OUT_HELP = "image file to write, in the format its extension names (.png, .jpg, ...)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, without argparse's usage block: the error is the part a reader needs.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_image_out(path: str) -> None:
    """--out of sample and reconstruct, checked before any work: a file named in a format Pillow writes."""
    from fastvae.images import image_format
    from fastvae.training.errors import ConfigError

    if Path(path).is_dir():
        raise ConfigError(f"--out {path} is a folder; name an image file, such as {Path(path) / 'grid.png'}")
    file_above = next((p for p in Path(path).parents if p.is_file()), None)
    if file_above is not None:
        raise ConfigError(f"--out {path}: {file_above} is a file, not a folder")
    try:
        image_format(path)
    except ValueError as exc:
        raise ConfigError(f"--out {exc}") from None


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvae.training.options import positive_int, seed_int

    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by fastvae train")
    parser.add_argument("--n", type=positive_int, default=64, help="number of samples (default: 64)")
    parser.add_argument("--out", required=True, help=IMAGE_OUT_HELP)
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the prior draws (default: 0)")
    parser.add_argument("--device", help="(default: cuda if available, else cpu)")


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from fastvae.images import save_grid
    from fastvae.model import VAE
    from fastvae.training.options import check_images_fit, resolve_device

    check_image_out(args.out)
    device = resolve_device(args.device)
    model = VAE.from_checkpoint(args.checkpoint, device=device)
    check_images_fit("--n", args.n, args.n, model.image_size, device)
    samples = model.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    print(save_grid(samples, args.out, nrow=math.ceil(math.sqrt(args.n))))
    return 0


def add_reconstruct_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvae.training.options import positive_int

    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by fastvae train")
    parser.add_argument("--data", metavar="DIR",
                        help="folder of images (its first --n in path order); default: held-out built-in shapes")
    parser.add_argument("--n", type=positive_int, default=16, help="number of images (default: 16)")
    parser.add_argument("--out", required=True, help=IMAGE_OUT_HELP)
    parser.add_argument("--device", help="(default: cuda if available, else cpu)")


def run_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from fastvae.checkpoint import load_model
    from fastvae.data import ImageFolder, Shapes
    from fastvae.images import save_grid, side_by_side
    from fastvae.training.options import check_images_fit, resolve_device

    check_image_out(args.out)
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, device=device)
    if args.data is None:
        # Shapes after the training run's own ones, so none of them was trained on.
        trained = ckpt.get("args", {})
        images = Shapes(args.n, model.image_size, seed=trained.get("seed", 0), offset=trained.get("train_size", 0))
    else:
        images = ImageFolder(args.data, model.image_size)
    n = min(args.n, len(images))
    check_images_fit("--n", args.n, 2 * n, model.image_size, device)  # each beside its reconstruction
    x = torch.stack([images[i] for i in range(n)]).to(device)
    print(save_grid(side_by_side(x, model.reconstruct(x)), args.out, nrow=8))
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by fastvae train")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder to write into: a new or empty one, or one that holds only an earlier "
                             "export (config.json, model.safetensors), which is replaced; any other is refused. "
                             "The temporaries a killed export left there are deleted first")


def run_export(args: argparse.Namespace) -> int:
    from fastvae import pretrained
    from fastvae._files import remove_stale_temporaries
    from fastvae.model import VAE
    from fastvae.training.errors import ConfigError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder")
    if out.is_dir():  # a running export's temporary is its own to finish: it is refused below
        remove_stale_temporaries(out, pretrained.FILES)
    others = sorted(p.name for p in out.iterdir() if not pretrained.FILES.fullmatch(p.name)) if out.is_dir() else []
    if others:
        raise ConfigError(
            f"--out {out} holds files other than an export's ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); name a new or empty folder"
        )
    folder = VAE.from_checkpoint(args.checkpoint).save_pretrained(out)
    print(f"wrote {folder / pretrained.WEIGHTS_NAME} and {folder / pretrained.CONFIG_NAME}")
    return 0


def _command(name: str) -> tuple[Callable, Callable]:
    """The (add_arguments, run) pair of a command."""
    if name == "sample":
        return add_sample_arguments, run_sample
    if name == "reconstruct":
        return add_reconstruct_arguments, run_reconstruct
    if name == "export":
        return add_export_arguments, run_export
    modules = {"train": "fastvae.training", "info": "fastvae.info", "bench": "fastvae.benchmarks.command"}
    module = importlib.import_module(modules[name])
    return module.add_arguments, module.run


def _say(line: str) -> None:
    """``line`` on stderr in one write. Under torchrun the ranks share stderr, and print() writes
    the text and the newline apart (Python's stderr is unbuffered): another rank's line could land
    between them."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _one_line(exc: BaseException) -> str:
    # An error raised in a DataLoader worker comes back with the worker's traceback in its message,
    # ending with the original "module.Error: message" line.
    line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return line.removeprefix(prefix)


def _checkpoint_warnings_in_one_line(command: str) -> None:
    """Show a CheckpointWarning as the command's other lines are, not as Python's two-line warning
    with a source line; leave every other warning to the way it was shown."""
    from fastvae.checkpoint import CheckpointWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CheckpointWarning):
            _say(f"fastvae {command}: warning: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the options of ``command`` (every command is listed, but only the chosen
    one's module is imported)."""
    parser = _Parser(prog="fastvae", description="Fused GPU kernels for VAE training, and a conv VAE to use them.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help in COMMANDS.items():
        sub = commands.add_parser(name, help=help, description=help)
        if name == command:
            _command(name)[0](sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        args = build_parser(command).parse_args(argv)
    except SystemExit as exc:  # --help, or a parse error already printed on one line
        return exc.code if isinstance(exc.code, int) else 2
    run = _command(args.command)[1]

    from fastvae.checkpoint import CheckpointError
    from fastvae.data import DataError
    from fastvae.training.errors import ConfigError, DivergedError, RankFailed, RankZeroFailed, Stopped

    try:
        with warnings.catch_warnings():
            _checkpoint_warnings_in_one_line(args.command)
            return run(args)
    except (ConfigError, DataError, CheckpointError, RankFailed, RankZeroFailed) as exc:
        _say(f"fastvae {args.command}: error: {_one_line(exc)}")
        return 2
    except OSError as exc:  # a file the run could not write after all: a full disk, a folder in the way
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"fastvae {args.command}: error: {where}{exc.strerror or exc}")
        return 2
    except DivergedError as exc:
        _say(f"fastvae {args.command}: {_one_line(exc)}")
        return 1
    except Stopped as exc:
        if exc.message is not None:
            _say(f"fastvae {args.command}: {exc.message}")
        return 128 + exc.signum
    except KeyboardInterrupt:
        pass  # answered below, once this exception and the run's frames it holds are gone
    # Those frames hold the run's DataLoader iterators: collected before the line, they stop their
    # workers first, so that no worker's dying output (cut off where the run's exit kills it)
    # lands after the run's last line.
    gc.collect()
    _say(f"fastvae {args.command}: interrupted")
    return 130
