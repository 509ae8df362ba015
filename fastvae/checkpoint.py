"""Training checkpoints: one file holding everything a run needs to go on exactly where it stopped.

A checkpoint is a plain dict of tensors and Python values, so it loads with
``torch.load(weights_only=True)``:

* ``model``, ``optimizer``, ``scaler``: the state dicts;
* ``config``: :attr:`fastvae.VAE.config`, enough to rebuild the model;
* ``step``: the number of optimizer steps taken, which also fixes the position in the data order;
* ``rng``: torch's CPU and CUDA generator states;
* ``args``: the training command's options, for the record;
* ``data``: :meth:`fastvae.data.ImageFolder.fingerprint` of ``--data`` (None for the built-in
  shapes, which the options fix), so that --resume can tell the folder changed;
* ``digest``: :func:`fastvae._digest.content_digest` of all the rest, added by :func:`save` and
  checked, then removed, by :func:`load`, so that a damaged file is never used. A file written
  before checkpoints carried one loads with a :class:`CheckpointWarning`.
"""

from __future__ import annotations

import inspect
import math
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from fastvae._checks import first_line
from fastvae._digest import content_digest
from fastvae._files import write_atomically
from fastvae.model import VAE

REQUIRED_KEYS = ("model", "config", "step")
# What `fastvae train --resume` needs beyond the model: a file holding only the weights can still be sampled.
TRAINING_KEYS = ("optimizer", "scaler", "rng")
# Every key a checkpoint written before the digest can hold: another key there is a damaged one
# (its "digest" key itself, say), never an older file's.
UNDIGESTED_KEYS = {*REQUIRED_KEYS, *TRAINING_KEYS, "args", "data"}


class CheckpointError(ValueError):
    """A file that is not a usable fastvae checkpoint (or saved model), or one of another architecture."""


class CheckpointWarning(UserWarning):
    """A checkpoint written before checkpoints carried a digest: it loads, unchecked for damage."""


def save(payload: dict, path: str | Path) -> None:
    """Write ``payload`` with its digest, atomically: a crash mid-write leaves the previous
    checkpoint in place. A write that fails (a full disk) raises the OSError that stopped it,
    naming ``path``."""
    if "digest" in payload:
        raise ValueError("the payload already has a 'digest' key; save adds it")
    payload = {**payload, "digest": content_digest(payload)}

    def write(f) -> None:
        try:
            torch.save(payload, f)
        except RuntimeError as exc:
            # torch's zip writer still closes the archive after the file's write failed, and its
            # own position check then fails ("unexpected pos"), hiding the OSError behind it, or
            # the KeyboardInterrupt of a second Ctrl-C (see write_atomically).
            if isinstance(exc.__context__, (OSError, KeyboardInterrupt)):
                raise exc.__context__ from None
            raise

    write_atomically(path, write)


def load(path: str | Path, map_location: str | torch.device = "cpu", *, resumable: bool = False) -> dict:
    """The checkpoint at ``path``, its digest checked and removed; CheckpointError, in one line, for
    anything else. ``resumable`` also requires the training state that --resume restores."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message is a page of advice on loading untrusted files: not what a user needs here.
        raise CheckpointError(f"{path}: not a fastvae checkpoint, or one that holds code (refused to load it)") from None
    except Exception as exc:
        # A damaged file fails anywhere in torch's reader (an IndexError deep in the unpickler), and
        # any such failure means the same: the file cannot be read.
        raise CheckpointError(f"{path}: not a readable checkpoint ({_reason(exc)})") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not a fastvae checkpoint (it needs {', '.join(REQUIRED_KEYS)})")
    _check_digest(checkpoint, path)
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


def _reason(exc: BaseException) -> str:
    # The first sentence names the problem ("... failed reading zip archive: not a ZIP archive").
    text = str(exc).strip()
    if isinstance(exc, (RuntimeError, EOFError, OSError, ValueError)) and text:
        return text.splitlines()[0].split(". ")[0]
    # Any other error comes from deep inside the reader: its type says more than its words.
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _check_digest(checkpoint: dict, path: Path) -> None:
    """Remove the checkpoint's digest after checking it against its contents; warn about a
    file written before checkpoints carried one."""
    if "digest" not in checkpoint:
        unknown = sorted(map(str, set(checkpoint) - UNDIGESTED_KEYS))
        if unknown:
            raise CheckpointError(f"{path}: damaged, or not a fastvae checkpoint (it holds {', '.join(unknown)})")
        warnings.warn(
            f"{path} has no digest (an older fastvae wrote it): it is loaded without a check for damage",
            CheckpointWarning,
            stacklevel=3,
        )
        return
    saved = checkpoint.pop("digest")
    try:
        found = content_digest(checkpoint)
    except TypeError as exc:
        raise CheckpointError(f"{path}: damaged, or not a fastvae checkpoint ({exc})") from None
    if not isinstance(saved, str) or saved != found:
        raise CheckpointError(
            f"{path}: damaged: its contents do not match the digest saved with them; "
            "use another copy, or an earlier checkpoint"
        )


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
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError, ArithmeticError) as exc:
        raise CheckpointError(f"{path}: {what} ({first_line(exc)})") from None


def build_model(
    config: dict, state: dict, path: str | Path, *, backend: str = "auto", device: str | torch.device = "cpu"
) -> VAE:
    """The model of ``config`` (:attr:`fastvae.VAE.config`) holding the weights ``state``, in eval
    mode; CheckpointError naming ``path`` when they do not fit each other.

    The config is first built on the meta device and checked against the weights, so a config of
    a model too large for memory is refused without allocating it: one that matches weights
    already in memory fits.
    """
    with _unusable(path, "its model cannot be rebuilt"):
        with torch.device("meta"):
            expected = VAE(**config, backend=backend).state_dict()
        _check_weights(state, expected)
        model = VAE(**config, backend=backend)
        model.load_state_dict(state)
    return model.to(device).eval()


def _check_weights(state: object, expected: dict) -> None:
    """The names, shapes and kinds of dtype of ``expected``: floating point weights load in any
    floating dtype (as load_state_dict casts them), the others in theirs."""
    if not isinstance(state, dict):
        raise TypeError(f"its weights should be a dict of tensors, got {type(state).__name__}")
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise ValueError(f"{unexpected[0]!r} is not a weight of the model its config describes")
    for name, like in expected.items():
        if name not in state:
            raise KeyError(name)
        tensor = state[name]
        if not torch.is_tensor(tensor):
            raise TypeError(f"{name} is a {type(tensor).__name__}, not a tensor")
        same_kind = tensor.is_floating_point() if like.is_floating_point() else tensor.dtype == like.dtype
        if tensor.shape != like.shape or not same_kind:
            raise ValueError(
                f"{name} is {tensor.dtype} of shape {tuple(tensor.shape)}, where its config gives "
                f"{like.dtype} of shape {tuple(like.shape)}"
            )


def load_model(path: str | Path, *, backend: str = "auto", device: str | torch.device = "cpu") -> tuple[VAE, dict]:
    """The model saved in the checkpoint at ``path``, in eval mode, and the checkpoint itself (its
    ``args`` say how it was trained). :meth:`fastvae.VAE.from_checkpoint` returns the model alone."""
    saved = load(path)
    return build_model(saved["config"], saved["model"], path, backend=backend, device=device), saved


def restore(
    checkpoint: dict,
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> None:
    """Load a checkpoint from :func:`load` (``resumable=True``) into the training state: the model,
    the optimizer, the grad scaler and torch's RNGs. Contents they cannot take raise CheckpointError,
    before any step: a value the first step would trip on is refused here, naming it."""
    with _unusable(path, "its model cannot be restored"):
        model.load_state_dict(checkpoint["model"])
    with _unusable(path, "its optimizer state cannot be restored"):
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(checkpoint["optimizer"])
        _check_hyperparameters(optimizer, fresh)
        _check_optimizer_state(optimizer)
    with _unusable(path, "its grad scaler state cannot be restored"):
        if checkpoint["scaler"]:  # empty when saved without fp16, which a resumed run may switch on
            _check_scaler_state(checkpoint["scaler"])
            scaler.load_state_dict(checkpoint["scaler"])
    with _unusable(path, "its RNG state cannot be restored"):
        set_rng_state(checkpoint["rng"])


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_hyperparameters(optimizer: torch.optim.Optimizer, fresh: list[dict]) -> None:
    """Each loaded hyperparameter must be of the kind the optimizer was built with: a finite,
    non-negative number where it had a number (betas below 1 too), a bool where it had one (or
    None), a pair of numbers where it had a pair. Otherwise the first step fails, or trains on NaN."""
    for index, (group, built) in enumerate(zip(optimizer.param_groups, fresh)):
        for key, default in built.items():
            where = f'param_groups[{index}]["{key}"]'
            if key not in group:
                raise ValueError(f"{where} is missing")
            value = group[key]
            if isinstance(default, bool) or default is None:
                ok = isinstance(value, bool) or (default is None and value is None)
                expected = "True or False" + (" or None" if default is None else "")
            elif isinstance(default, (tuple, list)):
                ok = isinstance(value, (tuple, list)) and len(value) == len(default)
                ok = ok and all(_is_real(v) and 0 <= v < (1 if key == "betas" else math.inf) for v in value)
                expected = f"{len(default)} finite numbers" + (" in [0, 1)" if key == "betas" else " >= 0")
            else:
                ok = _is_real(value) and value >= 0
                expected = "a finite number >= 0"
            if not ok:
                raise ValueError(f"{where} is {value!r}, where {expected} belongs")


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    # load_state_dict takes moments of any shape or type, and the first step would then fail mid-run.
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            where = f"{key} of parameter {index}"
            if not torch.is_tensor(value):
                raise ValueError(f"{where} is a {type(value).__name__}, not a tensor")
            if not bool(value.isfinite().all()):
                raise ValueError(f"{where} is not finite")
            if value.dim() > 0 and value.shape != param.shape:
                raise ValueError(
                    f"{where} has shape {tuple(value.shape)} but the parameter has {tuple(param.shape)}"
                )


def _check_scaler_state(state: object) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"it should be a dict, got {type(state).__name__}")
    for key, value in state.items():
        if not _is_real(value) or value < 0:
            raise ValueError(f"{key} is {value!r}, where a finite number >= 0 belongs")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
