import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae.data import (
    DataError,
    EpochBatches,
    ImageFolder,
    RESIZE_AREA_BOUND,
    Shapes,
    load_image,
    render_shapes,
    stack_on,
    train_eval_split,
)


@pytest.mark.parametrize("size", [16, 64])
def test_shapes_shape_range_and_content(size):
    images = torch.stack([Shapes(8, size, seed=3)[i] for i in range(8)])
    assert images.shape == (8, 3, size, size)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    # Each image is a shape on a plain background: the corner colour covers much but not all of it.
    background = (images - images[:, :, :1, :1]).abs().amax(1) < 1e-6
    covered = 1 - background.float().mean((1, 2))
    assert ((covered > 0.02) & (covered < 0.8)).all(), covered


def test_shapes_item_depends_only_on_seed_and_index():
    a = Shapes(10, 32, seed=1)
    assert torch.equal(a[3], Shapes(10, 32, seed=1)[3])
    assert torch.equal(a[3], a.__getitems__([7, 3])[1])  # whatever batch it is drawn in
    assert torch.equal(a[3], render_shapes(1, [3], 32)[0])
    assert not torch.equal(a[3], Shapes(10, 32, seed=2)[3])
    assert not torch.equal(a[3], a[4])
    # A held-out split is the same stream further on.
    assert torch.equal(Shapes(5, 32, seed=1, offset=5)[0], a[5])
    with pytest.raises(IndexError):
        a[10]


@pytest.mark.parametrize("size", [8, 24, 100, 8192, 2**40])
def test_shapes_reject_sizes_that_are_not_powers_of_two_from_16(size):
    with pytest.raises(ValueError, match="power of two"):
        Shapes(4, size)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_greyscale_images_are_scaled_by_their_range(tmp_path, suffix):
    # A ramp over the whole 16-bit range, constant along each column: 16x16, so no resizing.
    levels = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    _save(tmp_path / f"ramp{suffix}", levels)
    with Image.open(tmp_path / f"ramp{suffix}") as image:
        assert image.mode in ("I;16", "I")  # what the test is about
    image = ImageFolder(tmp_path, 16)[0]
    expected = torch.from_numpy(levels / 65535).float().expand(3, 16, 16)
    torch.testing.assert_close(image, expected, atol=0.5 / 255 + 1e-6, rtol=0)


@pytest.mark.parametrize(
    "values, mode, top",
    [
        (np.linspace(0, 1, 16, dtype=np.float32), "F", 1.0),  # floats are taken as already in [0, 1]
        (np.linspace(0, 2**31 - 1, 16).astype(np.int32), "I", 2**32 - 1),  # by the TIFF's 32 bits
    ],
)
def test_float_and_32_bit_images_are_scaled_by_their_range(tmp_path, values, mode, top):
    levels = np.tile(values, (16, 1))
    Image.fromarray(levels, mode).save(tmp_path / "ramp.tif")
    with Image.open(tmp_path / "ramp.tif") as image:
        assert image.mode == mode
    expected = torch.from_numpy(levels / top).float().expand(3, 16, 16)
    torch.testing.assert_close(ImageFolder(tmp_path, 16)[0], expected, atol=0.5 / 255 + 1e-6, rtol=0)


def test_a_float_image_of_0_5_is_grey_not_black(tmp_path):
    Image.fromarray(np.full((16, 16), 0.5, np.float32), "F").save(tmp_path / "grey.tif")
    assert ImageFolder(tmp_path, 16)[0].sub(128 / 255).abs().max() < 1e-6


@pytest.mark.parametrize(
    "pixels, mode, message",
    [
        (np.full((16, 16), 2.0, np.float32), "F", r"expected a float image \(mode F\) in \[0, 1\], got values from 2.0 to 2.0"),
        (np.full((16, 16), np.nan, np.float32), "F", r"expected a float image \(mode F\) in \[0, 1\], got values from nan to nan"),
        (np.full((16, 16), -5, np.int32), "I", r"expected a 32-bit integer image \(mode I\) in 0..4294967295, got values from -5.0"),
    ],
)
def test_float_and_integer_images_out_of_their_range_are_refused(tmp_path, pixels, mode, message):
    Image.fromarray(pixels, mode).save(tmp_path / "bad.tif")
    with pytest.raises(DataError, match=f"bad.tif: cannot read image \\({message}"):
        ImageFolder(tmp_path, 16)[0]


def test_shapes_split_is_disjoint():
    train, held_out = train_eval_split(None, 16, seed=0, train_size=20, eval_size=6)
    assert (len(train), len(held_out)) == (20, 6)
    train_images = torch.stack([train[i] for i in range(20)])
    for i in range(6):
        assert not (train_images == held_out[i]).flatten(1).all(1).any()


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_reads_recursively_resizes_and_centre_crops(tmp_path):
    # 64 wide, 32 high: black quarters left and right of a white middle half. Resized to 32x16
    # and centre-cropped to 16x16, only the white middle remains.
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 16:48] = 255
    _save(tmp_path / "a" / "wide.png", wide)
    _save(tmp_path / "b" / "c" / "grey.jpg", np.full((20, 20), 128, np.uint8))
    Image.fromarray(np.zeros((16, 16, 4), np.uint8), "RGBA").save(tmp_path / "rgba.PNG")
    (tmp_path / "notes.txt").write_text("not an image")

    folder = ImageFolder(tmp_path, 16)
    assert [p.relative_to(tmp_path).as_posix() for p in folder.files] == ["a/wide.png", "b/c/grey.jpg", "rgba.PNG"]
    for i in range(len(folder)):
        assert folder[i].shape == (3, 16, 16) and folder[i].dtype == torch.float32
        assert folder[i].min() >= 0 and folder[i].max() <= 1
    assert folder[0][:, :, 2:-2].min() > 0.95
    assert folder[1].sub(128 / 255).abs().max() < 0.02


def resized_whole_and_cropped(path, size):
    """The shorter side resized to ``size`` over the whole image, bicubic, then the centre crop: as
    fastvae has always read an image, written out here with Pillow alone."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        whole = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
        left, top = (whole[0] - size) // 2, (whole[1] - size) // 2
        image = image.resize(whole, Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize(
    "width, height, size",
    # Landscape, portrait, square, odd sizes, one pixel, and 4:1, the last aspect ratio resized whole.
    [(64, 48, 32), (48, 64, 32), (640, 480, 64), (100, 37, 16), (37, 111, 16), (50, 50, 16), (1, 1, 16), (3, 12, 16)],
)
def test_ordinary_images_are_read_as_ever_bit_for_bit(tmp_path, width, height, size):
    assert width * height <= RESIZE_AREA_BOUND * min(width, height) ** 2
    pixels = np.random.default_rng([width, height]).integers(0, 256, (height, width, 3), dtype=np.uint8)
    _save(tmp_path / "image.png", pixels)
    assert torch.equal(load_image(tmp_path / "image.png", size), resized_whole_and_cropped(tmp_path / "image.png", size))


@pytest.mark.parametrize("width, height, size", [(2000, 1, 16), (1, 2000, 16), (900, 40, 32), (25, 700, 16)])
def test_a_strip_resizes_only_its_crop_and_agrees_with_the_whole_image(tmp_path, width, height, size):
    # Beyond the bound Pillow may take its two passes in the other order: on a smooth image that
    # moves a pixel by a level or two of 255, no more.
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([127.5 + 127 * np.sin(x / 9 + y / 13 + c) for c in range(3)], -1).astype(np.uint8)
    _save(tmp_path / "strip.png", pixels)
    assert width * height > RESIZE_AREA_BOUND * min(width, height) ** 2
    loaded = load_image(tmp_path / "strip.png", size)
    torch.testing.assert_close(loaded, resized_whole_and_cropped(tmp_path / "strip.png", size), atol=2 / 255, rtol=0)


# Reads one image in a process of its own and prints the growth of its peak memory (KiB) over a
# warm-up read, and the mean pixel. The address space is capped 1 GiB above what the warm-up left
# mapped, so a read that would resize a strip whole fails there instead of taking the machine's memory.
PEAK_MEMORY_PROBE = """
import resource, sys
from pathlib import Path
from fastvae.data import load_image
load_image(Path(sys.argv[1]), 16)
mapped = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_image(Path(sys.argv[2]), int(sys.argv[3]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, tuple(image.shape), image.mean().item(), sep="|")
"""


@pytest.mark.parametrize("width, height, size", [(40000, 1, 32), (1, 10**6, 256)])
def test_a_strip_of_extreme_aspect_ratio_is_read_in_little_memory(tmp_path, width, height, size):
    # Resized whole, the 40000x1 strip would be 1280000x32 (about 160 MB), the 1x10^6 one 256x256000000.
    # A ramp from 0 to 255 along the strip: the crop, at its middle, is mid-grey.
    ramp = (np.arange(max(width, height)) * 255 // max(width, height)).astype(np.uint8)
    _save(tmp_path / "strip.png", np.repeat(ramp.reshape(height, width, 1), 3, axis=2))
    _save(tmp_path / "warm.png", np.zeros((20, 30, 3), np.uint8))
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_PROBE, tmp_path / "warm.png", tmp_path / "strip.png", str(size)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    growth_kib, shape, mean = result.stdout.strip().split("|")
    assert shape == f"(3, {size}, {size})"
    assert abs(float(mean) - 127.5 / 255) < 2 / 255
    # The decoded file (4 bytes a pixel) and the window under the crop; not the strip resized whole.
    assert int(growth_kib) < 4 * width * height / 1024 + 16 * 1024


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images found"):
        ImageFolder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        ImageFolder(tmp_path, 16)[0]


def test_folder_split_holds_out_a_tenth(tmp_path):
    for i in range(30):
        _save(tmp_path / f"{i:02d}.png", np.full((16, 16, 3), i, np.uint8))
    train, held_out = train_eval_split(tmp_path, 16, seed=0, train_size=0, eval_size=100)
    assert (len(train), len(held_out)) == (27, 3)
    assert not set(train.indices) & set(held_out.indices)
    assert train_eval_split(tmp_path, 16, seed=0, train_size=0, eval_size=100)[1].indices == held_out.indices


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_epoch_batches_are_seeded_permutations():
    batches = _take(EpochBatches(10, 3, seed=5), 6)  # 3 batches per epoch, 1 item dropped
    assert batches == _take(EpochBatches(10, 3, seed=5), 6)
    assert batches != _take(EpochBatches(10, 3, seed=6), 6)
    for epoch in (batches[:3], batches[3:]):
        items = [i for batch in epoch for i in batch]
        assert len(set(items)) == 9 and set(items) <= set(range(10))
    assert batches[:3] != batches[3:]


def test_epoch_batches_start_and_shards():
    whole = _take(EpochBatches(20, 4, seed=0), 12)
    assert _take(EpochBatches(20, 4, seed=0, start=7), 5) == whole[7:]
    ranks = [_take(EpochBatches(20, 4, seed=0, rank=r, world_size=2), 12) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == whole


def test_epoch_batches_keep_the_order_checkpoints_resume_in():
    # A checkpoint taken mid-epoch resumes in this order: it must not change.
    expected = np.random.default_rng([5, 1]).permutation(10)[:9].reshape(3, 3).tolist()
    assert _take(EpochBatches(10, 3, seed=5, start=3), 3) == expected


def test_a_dataset_stacked_on_a_device_holds_its_items_in_order():
    shapes = Shapes(11, 16, seed=4)
    stacked = stack_on(shapes, torch.device("cpu"), chunk=4)  # a last chunk of 3
    assert stacked.shape == (11, 3, 16, 16) and stacked.dtype == torch.float32
    # Rendered in chunks rather than one by one: equal to float32 rounding.
    torch.testing.assert_close(stacked, torch.stack([shapes[i] for i in range(11)]))


def test_epoch_batches_errors():
    with pytest.raises(DataError, match="fewer than one batch"):
        EpochBatches(3, 4, seed=0)
    with pytest.raises(ValueError, match="split evenly"):
        EpochBatches(30, 5, seed=0, world_size=2)
