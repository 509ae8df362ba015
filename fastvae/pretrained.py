"""A trained model as diffusers and the Hub keep one: a folder holding ``config.json`` (the
model's :attr:`fastvae.VAE.config`) and ``model.safetensors`` (its weights, which load without
pickle, so without running code). The weights carry the digest checkpoints do, in the
safetensors metadata, and loading checks it: a damaged file is refused, not used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fastvae import __version__
from fastvae._checks import first_line
from fastvae._digest import content_digest
from fastvae._files import write_atomically
from fastvae.checkpoint import CheckpointError, build_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# The files save writes, by name: all that `fastvae export` replaces in its --out, and those whose
# temporaries a killed export leaves there.
FILES = re.compile(f"{re.escape(CONFIG_NAME)}|{re.escape(WEIGHTS_NAME)}")
CLASS_NAME = "fastvae.VAE"
# What config.json must hold: the entries of VAE.config that are always there.
CONFIG_KEYS = ("in_channels", "image_size", "latent_dim", "hidden_dims")
DIGEST_KEY = "fastvae_digest"


def save(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write ``model``'s config and weights into ``folder`` (made if missing), each file atomically.
    The weights go first: a crash between the two leaves the old config, which a changed
    architecture then fails to match, in one line, rather than loading wrong."""
    from safetensors.torch import save as safetensors_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = _sorted({name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()})
    data = safetensors_bytes(weights, metadata={"format": "pt", DIGEST_KEY: content_digest(weights)})
    write_atomically(folder / WEIGHTS_NAME, lambda f: f.write(data))
    config = {"_class_name": CLASS_NAME, "_fastvae_version": __version__, **model.config}
    text = json.dumps(config, indent=2) + "\n"
    write_atomically(folder / CONFIG_NAME, lambda f: f.write(text.encode()))
    return folder


def load(folder: str | Path, *, backend: str = "auto", device: str | torch.device = "cpu"):
    """The model :func:`save` wrote into ``folder``, in eval mode; CheckpointError, in one line
    naming the file, for a folder or file that cannot be used."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (save_pretrained and fastvae export write one)")
    config = _read_config(folder / CONFIG_NAME)
    weights = _read_weights(folder / WEIGHTS_NAME)
    return build_model(config, weights, folder, backend=backend, device=device)


def _read_config(path: Path) -> dict:
    def not_json(constant: str):
        raise ValueError(f"{constant} is not JSON")

    try:
        config = json.loads(path.read_bytes(), parse_constant=not_json)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a readable config ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a model config (it should be a JSON object, got {type(config).__name__})")
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise CheckpointError(f"{path}: the config of a {config['_class_name']!r}, not of a {CLASS_NAME}")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise CheckpointError(f"{path}: not a model config (no {', '.join(missing)} in it)")
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _read_weights(path: Path) -> dict:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            weights = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors' own error for a bad header, and torch's for a bad dtype
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    # A file another tool wrote has no digest: it loads as the format alone allows.
    if DIGEST_KEY in metadata and metadata[DIGEST_KEY] != content_digest(_sorted(weights)):
        raise CheckpointError(f"{path}: damaged: its weights do not match the digest saved with them")
    return weights


def _sorted(weights: dict) -> dict:
    # safetensors keeps the tensors in an order of its own: the digest takes them by name.
    return dict(sorted(weights.items()))
