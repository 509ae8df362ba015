"""Training checkpoints: one file holding everything a run needs to go on exactly where it stopped.

A checkpoint is a plain dict of tensors and Python values, so it loads with
``torch.load(weights_only=True)``:

* ``model``, ``optimizer``, ``scaler``: the state dicts;
* ``config``: :attr:`fastvae.VAE.config`, enough to rebuild the model;
* ``step``: the number of optimizer steps taken, which also fixes the position in the data order;
* ``rng``: torch's CPU and CUDA generator states;
* ``args``: the training command's options, for the record;
* ``data``: :meth:`fastvae.data.ImageFolder.fingerprint` of ``--data`` (None for the built-in
  shapes, which the options fix), so that --resume can tell the folder changed.
"""

from __future__ import annotations

import inspect
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from fastvae._files import write_atomically
from fastvae.model import VAE

REQUIRED_KEYS = ("model", "config", "step")
# What `fastvae train --resume` needs beyond the model: a file holding only the weights can still be sampled.
TRAINING_KEYS = ("optimizer", "scaler", "rng")


class CheckpointError(ValueError):
    """A file that is not a usable fastvae checkpoint, or one of another architecture."""


def save(payload: dict, path: str | Path) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint in place. A write that
    fails (a full disk) raises the OSError that stopped it, naming ``path``."""

    def write(f) -> None:
        try:
            torch.save(payload, f)
        except RuntimeError as exc:
            # torch's zip writer still closes the archive after the file's write failed, and its
            # own position check then fails ("unexpected pos"), hiding the OSError behind it.
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise

    write_atomically(path, write)


def load(path: str | Path, map_location: str | torch.device = "cpu", *, resumable: bool = False) -> dict:
    """The checkpoint at ``path``; CheckpointError, in one line, for anything else. ``resumable``
    also requires the training state that --resume restores."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message is a page of advice on loading untrusted files: not what a user needs here.
        raise CheckpointError(f"{path}: not a fastvae checkpoint, or one that holds code (refused to load it)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        # The first sentence names the problem ("... failed reading zip archive: not a ZIP archive").
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not a fastvae checkpoint (it needs {', '.join(REQUIRED_KEYS)})")
    if isinstance(checkpoint["step"], bool) or not isinstance(checkpoint["step"], int) or checkpoint["step"] < 0:
        raise CheckpointError(f"{path}: not a fastvae checkpoint (its step is {checkpoint['step']!r})")
    for key in ("config", "args"):  # args: absent from the oldest checkpoints
        if not isinstance(checkpoint.get(key, {}), dict):
            raise CheckpointError(
                f"{path}: not a fastvae checkpoint (its {key} should be a dict, got {type(checkpoint[key]).__name__})"
            )
    missing = [key for key in TRAINING_KEYS if key not in checkpoint] if resumable else []
    if missing:
        raise CheckpointError(
            f"{path} holds a model but not the training state to resume from (no {', '.join(missing)})"
        )
    return checkpoint


def check_config(checkpoint_config: dict, config: dict, path: str | Path) -> None:
    """Raise CheckpointError naming each architecture setting where the two configs differ. A
    setting a config leaves out is VAE's default (``recon``, absent for "mse" and from checkpoints
    written before it existed)."""
    defaults = {name: p.default for name, p in inspect.signature(VAE).parameters.items()}

    def value(of: dict, key: str) -> tuple[object, str]:
        return (of[key], repr(of[key])) if key in of else (defaults.get(key), f"{defaults.get(key)!r} (the default)")

    differences = []
    for key in sorted(set(checkpoint_config) | set(config)):
        (there, there_text), (here, here_text) = value(checkpoint_config, key), value(config, key)
        if there != here:
            differences.append(f"{key}={there_text} there but {here_text} here")
    if differences:
        raise CheckpointError(f"{path} holds a model of another architecture: {'; '.join(differences)}")


@contextmanager
def _unusable(path: str | Path, what: str) -> Iterator[None]:
    """Turn an error raised by torch or the model while taking in the checkpoint's contents (a
    tensor of the wrong shape, a missing entry) into a CheckpointError: "{path}: {what} (why)"."""
    try:
        yield
    except KeyError as exc:
        raise CheckpointError(f"{path}: {what} (no {exc.args[0]!r} in it)") from None
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: {what} ({reason})") from None


def load_model(path: str | Path, *, backend: str = "auto", device: str | torch.device = "cpu") -> tuple[VAE, dict]:
    """The model saved in the checkpoint at ``path``, in eval mode, and the checkpoint itself."""
    checkpoint = load(path)
    with _unusable(path, "its model cannot be rebuilt"):
        model = VAE(**checkpoint["config"], backend=backend)
        model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def restore(
    checkpoint: dict,
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> None:
    """Load a checkpoint from :func:`load` (``resumable=True``) into the training state: the model,
    the optimizer, the grad scaler and torch's RNGs. Contents they cannot take raise CheckpointError."""
    with _unusable(path, "its model cannot be restored"):
        model.load_state_dict(checkpoint["model"])
    with _unusable(path, "its optimizer state cannot be restored"):
        optimizer.load_state_dict(checkpoint["optimizer"])
        _check_optimizer_state(optimizer)
    with _unusable(path, "its grad scaler state cannot be restored"):
        if checkpoint["scaler"]:  # empty when saved without fp16, which a resumed run may switch on
            scaler.load_state_dict(checkpoint["scaler"])
    with _unusable(path, "its RNG state cannot be restored"):
        set_rng_state(checkpoint["rng"])


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    # load_state_dict takes moments of any shape, and the first step would then fail mid-run.
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(
                    f"{key} of parameter {index} has shape {tuple(value.shape)} "
                    f"but the parameter has {tuple(param.shape)}"
                )


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
