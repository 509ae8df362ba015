"""PNG grids of images with Pillow: reconstructions, prior samples and latent interpolations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastvae._files import write_atomically


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``images`` (N, C, H, W), row by row, ``nrow`` to a row, into one image (C, H', W')."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = images.new_full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i, image in enumerate(images):
        top = (i // ncol) * (h + padding) + padding
        left = (i % ncol) * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = image
    return grid


def image_format(path: str | Path) -> str:
    """The Pillow format that ``path``'s extension names ("PNG" for .png, "JPEG" for .jpg, ...)."""
    Image.init()
    suffix = Path(path).suffix.lower()
    file_format = Image.registered_extensions().get(suffix)
    if file_format not in Image.SAVE:
        raise ValueError(f"{path}: cannot tell the image format from {suffix or 'no extension'}; name a .png or .jpg file")
    return file_format


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write ``images`` (N, C, H, W) in [0, 1] as a grid, in the format of ``path``'s extension,
    through a tmp file and a rename so that a reader never sees half a file."""
    file_format = image_format(path)
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return write_atomically(path, lambda f: image.save(f, format=file_format))


def side_by_side(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Interleave two batches so each original is followed by its reconstruction; with an even
    ``nrow``, each original sits beside its reconstruction in the grid."""
    return torch.stack([originals, reconstructions.to(originals.dtype)], 1).flatten(0, 1)
