"""Training data: built-in coloured shapes made on the fly, or a folder of images.

Both are map-style datasets of float32 images (3, S, S) in [0, 1]. The order in which a run
visits them is :class:`EpochBatches`, a function of (seed, epoch) alone, so a resumed run
sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from fastvae._workers import init_worker, start

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TIFF_BITS_PER_SAMPLE = 258  # the TIFF tag

# One 4096x4096 RGB image is 200 MB in float32; larger sizes are typos that would end in a failed
# allocation.
MAX_IMAGE_SIZE = 4096

# An image is resized whole and then cropped, as long as its resized size is at most this many
# times the crop's: every photograph's aspect ratio (up to 4:1). Beyond, only its crop's part is
# resized, bounding the work and memory of an image by its crop, not by its aspect ratio.
RESIZE_AREA_BOUND = 4

SHAPE_KINDS = ("square", "ellipse", "triangle")

# Per-image draws, in this order, as columns of the uniform numbers behind each image.
_KIND, _CX, _CY, _SIZE, _ANGLE, _ASPECT, _FG, _BG = 0, 1, 2, 3, 4, 5, slice(6, 9), slice(9, 12)
_NUM_DRAWS = 12


class DataError(ValueError):
    """The training data cannot be used: a missing or empty folder, an unreadable image."""


def check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size < 16 or image_size > MAX_IMAGE_SIZE or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two from 16 to {MAX_IMAGE_SIZE}, got {image_size}")


def render_shapes(seed: int, indices: Sequence[int], image_size: int) -> torch.Tensor:
    """Images (len(indices), 3, S, S) of one shape each; image i depends only on (seed, i).

    Each image is a square, an ellipse or an equilateral triangle with a random centre, size,
    rotation and bright colour on a dark plain background. All images are rasterised at once,
    with edges anti-aliased over one pixel from a signed distance to the shape's outline.
    """
    check_image_size(image_size)
    # One independent stream per (seed, index): the same image whatever batch it is drawn in.
    draws = np.stack([np.random.default_rng([seed, int(i)]).random(_NUM_DRAWS) for i in indices])
    u = torch.from_numpy(draws.reshape(-1, _NUM_DRAWS)).float()
    n = u.shape[0]

    kind = (u[:, _KIND] * len(SHAPE_KINDS)).long().clamp(max=len(SHAPE_KINDS) - 1)
    size = 0.4 + 0.4 * u[:, _SIZE]  # half-extent, in units of half the image width
    centre = (2 * u[:, [_CX, _CY]] - 1) * (1 - size).unsqueeze(1)
    angle = 2 * math.pi * u[:, _ANGLE]
    aspect = 0.5 + 0.5 * u[:, _ASPECT]  # ellipse minor / major axis
    foreground = 0.35 + 0.65 * u[:, _FG]
    background = 0.3 * u[:, _BG]

    # Pixel centres in [-1, 1], moved into each shape's frame: centred, unrotated, unit size.
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) * (2 / image_size) - 1
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    dx = px - centre[:, 0, None, None]
    dy = py - centre[:, 1, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    scale = size[:, None, None]
    qx = (cos * dx + sin * dy) / scale
    qy = (cos * dy - sin * dx) / scale

    square = torch.maximum(qx.abs(), qy.abs()) - 0.8
    ellipse = torch.hypot(qx, qy / aspect[:, None, None]) - 1
    # An equilateral triangle is the intersection of three half-planes at inradius 0.5.
    normals = torch.tensor([math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)])
    triangle = (qx.unsqueeze(-1) * normals.cos() + qy.unsqueeze(-1) * normals.sin()).amax(-1) - 0.5
    distance = torch.stack([square, ellipse, triangle], 1)[torch.arange(n), kind]

    pixel = 2 / image_size
    coverage = (0.5 - distance * scale / pixel).clamp(0, 1).unsqueeze(1)
    return torch.lerp(background[:, :, None, None], foreground[:, :, None, None], coverage)


class Shapes(Dataset):
    """``length`` shapes images, items ``offset`` to ``offset + length - 1`` of the stream for ``seed``.

    Disjoint offsets give disjoint splits: the held-out set is the items after the training ones.
    """

    def __init__(self, length: int, image_size: int = 64, *, seed: int = 0, offset: int = 0) -> None:
        check_image_size(image_size)
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        self.length = length
        self.image_size = image_size
        self.seed = seed
        self.offset = offset

    def __len__(self) -> int:
        return self.length

    def _stream_indices(self, indices: Sequence[int]) -> list[int]:
        for i in indices:
            if not 0 <= i < self.length:
                raise IndexError(f"index {i} is out of range for {self.length} images")
        return [self.offset + i for i in indices]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        # DataLoader calls this with a whole batch of indices, so a batch is rendered in one go.
        return list(render_shapes(self.seed, self._stream_indices(indices), self.image_size).unbind(0))


def _integer_bits(image: Image.Image) -> int:
    """The bit depth of a greyscale integer image (mode I or I;16): its samples run from 0 to 2**bits - 1."""
    if image.mode.startswith("I;16"):
        return 16
    if image.format == "TIFF":
        return image.tag_v2.get(TIFF_BITS_PER_SAMPLE, (32,))[0]
    if image.format == "PNG":  # 16 bits, the deepest PNG sample, which older Pillows open as mode I
        return 16
    raise ValueError(f"a {image.format} image of mode I has no bit depth to scale it by; save it with 8 or 16 bits")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits a channel. Pillow's own conversion clips greyscale integers (mode I, I;16)
    and floats (mode F) at 255 and truncates them, which makes 16-bit images nearly all white
    and float ones in [0, 1] black, so those are scaled here instead: integers by their bit depth
    (0..2**bits - 1), floats as already in [0, 1]. Values outside the range are refused."""
    if image.mode == "F":
        values, top, kind = np.asarray(image, dtype=np.float64), 1.0, "a float image (mode F) in [0, 1]"
    elif image.mode == "I" or image.mode.startswith("I;16"):
        bits = _integer_bits(image)
        values, top = np.asarray(image, dtype=np.float64), 2.0**bits - 1
        kind = f"a {bits}-bit integer image (mode {image.mode}) in 0..{2**bits - 1}"
    else:
        return image.convert("RGB")
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > top:
        raise ValueError(f"expected {kind}, got values from {values.min()} to {values.max()}")
    return Image.fromarray((values * (255 / top)).round().astype(np.uint8)).convert("RGB")


def _resize_and_crop(image: Image.Image, image_size: int) -> Image.Image:
    """The centre S x S of ``image`` resized, bicubic, so that its shorter side is S."""
    width, height = image.size
    ratio = image_size / min(width, height)
    resized = (max(image_size, round(width * ratio)), max(image_size, round(height * ratio)))
    left = (resized[0] - image_size) // 2
    top = (resized[1] - image_size) // 2
    if resized[0] * resized[1] <= RESIZE_AREA_BOUND * image_size**2:
        return image.resize(resized, Image.Resampling.BICUBIC).crop((left, top, left + image_size, top + image_size))
    # Resized whole, a strip of extreme aspect ratio would be far larger than its crop (a 40000x1
    # PNG at 32 would be 1280000x32): only the source pixels under the crop, and the filter's reach
    # around them, are resized instead. The window's offset keeps the box's corners small, as Pillow
    # rounds them to float32; Pillow may also take its two passes in the other order than for the
    # whole image, so pixels can differ from the whole-image path by a few levels.
    box, window = [], []
    for size, first, resized_size in zip((width, height), (left, top), resized):
        scale = size / resized_size
        reach = 2 * max(scale, 1.0) + 1  # bicubic's support, widened by a downscale as Pillow's is
        low, high = first * scale, (first + image_size) * scale
        window.append((max(0, math.floor(low - reach)), min(size, math.ceil(high + reach))))
        box.append((low - window[-1][0], high - window[-1][0]))
    (x0, x1), (y0, y1) = window
    (left_in, right_in), (top_in, bottom_in) = box
    part = image.crop((x0, y0, x1, y1))
    return part.resize((image_size, image_size), Image.Resampling.BICUBIC, box=(left_in, top_in, right_in, bottom_in))


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """An image file as RGB (3, S, S) in [0, 1]: shorter side resized to S, then centre-cropped."""
    try:
        with Image.open(path) as image:
            image = _resize_and_crop(_to_rgb(image), image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


class ImageFolder(Dataset):
    """Every image under ``root`` (recursively, by extension), in sorted path order."""

    def __init__(self, root: str | Path, image_size: int = 64) -> None:
        check_image_size(image_size)
        self.root = Path(root)
        self.image_size = image_size
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.files:
            raise DataError(f"{self.root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")

    def fingerprint(self) -> dict:
        """What the folder holds, cheaply: the number of images and a digest of each one's path
        (relative to the root, so the folder may move), size and modification time. An image added,
        removed, rewritten or touched changes it; a copy that keeps the times (cp -p, rsync -a) does not."""
        digest = hashlib.sha256()
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return {"images": len(self.files), "digest": digest.hexdigest()}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.files[index], self.image_size)


def train_eval_split(
    folder: str | Path | None,
    image_size: int,
    *,
    seed: int,
    train_size: int,
    eval_size: int,
) -> tuple[Dataset, Dataset]:
    """The training set and the held-out set.

    Without ``folder``: ``train_size`` shapes images and the next ``eval_size`` of the same stream.
    With a folder: a seeded choice of ``min(eval_size, n // 10)`` of its n images is held out; a
    folder of fewer than 10 images has no held-out part, and is evaluated on its training images.
    """
    if folder is None:
        return (
            Shapes(train_size, image_size, seed=seed),
            Shapes(eval_size, image_size, seed=seed, offset=train_size),
        )
    images = ImageFolder(folder, image_size)
    n_eval = min(eval_size, len(images) // 10)
    if n_eval == 0:
        return images, images
    order = np.random.default_rng([seed, len(images)]).permutation(len(images)).tolist()
    return Subset(images, sorted(order[n_eval:])), Subset(images, sorted(order[:n_eval]))


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    return _permutation(n, seed, epoch).tolist()


def device_permutation(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """epoch_permutation's order as an int64 tensor on ``device``.

    The order is drawn on the host, so a run keeps one order whichever way its data reaches the
    device (kept there, or a DataLoader) and whichever GPU it resumes on: a generator on the GPU
    would give each path, and each GPU model (torch sizes the draw by the SM count), its own. The
    copy leaves from pinned memory without blocking, so the host never waits for the GPU's queue;
    the pinned allocator holds the buffer until the copy has run.
    """
    order = torch.from_numpy(_permutation(n, seed, epoch).astype(np.int64, copy=False))
    if device.type == "cuda":
        return order.pin_memory().to(device, non_blocking=True)
    return order.to(device)


class EpochBatches(Sampler[list[int]]):
    """An endless batch sampler: global batch ``k`` is slice ``k % per_epoch`` of epoch ``k // per_epoch``'s
    permutation of the dataset, a function of (seed, epoch) only; the incomplete last batch is dropped.

    With several ranks each yields its own contiguous part of every global batch, so the ranks
    together see exactly the batches of a single process. ``start`` is the first global batch to
    yield: a resumed run passes the number of steps already taken.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split evenly across {world_size} processes")
        if num_items < batch_size:
            raise DataError(f"the dataset has {num_items} images, fewer than one batch of {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.per_epoch = num_items // batch_size
        shard = batch_size // world_size
        self.shard = slice(rank * shard, (rank + 1) * shard)

    def __iter__(self) -> Iterator[list[int]]:
        return self._slices(lambda epoch: epoch_permutation(self.num_items, self.seed, epoch))

    def on_device(self, device: torch.device) -> Iterator[torch.Tensor]:
        """The batches ``iter`` yields, as int64 tensors on ``device`` (device_permutation): no
        epoch waits on a copy from the host, and no step asks anything of it."""
        return self._slices(lambda epoch: device_permutation(self.num_items, self.seed, epoch, device))

    def _slices(self, permutation):
        k = self.start
        epoch, order = -1, None
        while True:
            if k // self.per_epoch != epoch:
                epoch = k // self.per_epoch
                order = permutation(epoch)
            first = (k % self.per_epoch) * self.batch_size
            yield order[first : first + self.batch_size][self.shard]
            k += 1


def stack_on(dataset: Dataset, device: torch.device, *, workers: int = 0, chunk: int = 256) -> torch.Tensor:
    """The whole of ``dataset`` as one tensor on ``device``, item i at row i: read through a
    DataLoader in order, ``chunk`` items at a time, so shapes are rendered a batch at a time and
    ``workers`` decode image files in parallel."""
    # Its own generator: starting the loader draws a seed, which must not come from torch's global
    # generator, the training noise.
    loader = DataLoader(
        dataset, batch_size=chunk, num_workers=workers, worker_init_fn=init_worker, generator=torch.Generator()
    )
    images = None
    for i, batch in enumerate(start(loader)):
        if images is None:
            images = torch.empty(len(dataset), *batch.shape[1:], dtype=batch.dtype, device=device)
        images[i * chunk : i * chunk + len(batch)] = batch
    return images
