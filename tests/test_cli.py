import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastvae.cli import _one_line, main
from fastvae.data import DataError, ImageFolder
from test_train import REPO, TINY, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train(out, "--steps", 4, "--every", 4) == 0
    return out / "ckpt.pt"


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    return images


def _png(path):
    with Image.open(path) as image:
        return image.mode, image.size, np.asarray(image)


def test_sample_writes_a_grid(trained, tmp_path):
    out = tmp_path / "samples.png"
    assert main(["sample", "--checkpoint", str(trained), "--n", "6", "--out", str(out), "--device", "cpu"]) == 0
    mode, size, _ = _png(out)
    assert mode == "RGB" and size == (3 * 18 + 2, 2 * 18 + 2)  # 3 x 2 tiles of 16 pixels, 2 apart


def test_reconstruct_writes_originals_beside_reconstructions(trained, folder, tmp_path):
    out = tmp_path / "shapes.png"
    assert main(["reconstruct", "--checkpoint", str(trained), "--out", str(out), "--device", "cpu"]) == 0
    assert _png(out)[1] == (8 * 18 + 2, 4 * 18 + 2)  # 16 pairs, 8 tiles to a row

    out = tmp_path / "folder.png"
    assert main(["reconstruct", "--checkpoint", str(trained), "--data", str(folder), "--out", str(out)]) == 0
    _, size, pixels = _png(out)
    assert size == (6 * 18 + 2, 18 + 2)
    for i in range(3):  # originals in the even tiles
        tile = pixels[2:18, 2 + 36 * i : 18 + 36 * i]
        assert np.abs(tile.astype(int) - 60 * i).max() <= 1


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["train", "--no-such-option"], "unrecognized arguments"),
        (["train", "--image-size", "24"], "power of two"),
        (["train", "--hidden-dims", "8,x"], "comma-separated ints"),
        (["train", "--batch-size", "0"], "expected int >= 1, got '0'"),
        (["train", "--lr", "0"], "expected float > 0"),
        (["train", "--seed", "-3"], "expected int >= 0"),
        (["train", "--free-bits", "-1"], ">= 0"),
        (["train", "--device", "tpu"], "not a device name"),
        (["train", "--amp", "fp16", "--device", "cpu"], "needs a CUDA device"),
        (["train", "--data", "{tmp}/missing"], "no such folder"),
        (["train", "--data", "{tmp}"], "no images found"),
        (["train", *TINY, "--batch-size", "128"], "fewer than one batch"),
        (["sample", "--checkpoint", "{tmp}/missing.pt", "--out", "{tmp}/x.png"], "no such checkpoint"),
        (["sample", "--checkpoint", "{tmp}/garbage.pt", "--out", "{tmp}/x.png"], "not a readable checkpoint"),
        (["sample", "--checkpoint", "{tmp}/dict.pt", "--out", "{tmp}/x.png"], "not a fastvae checkpoint"),
        (["sample", "--checkpoint", "{tmp}/other.pt", "--out", "{tmp}/x.png"], "its model cannot be rebuilt"),
        (["sample", "--checkpoint", "{ckpt}", "--n", "0", "--out", "{tmp}/x.png"], "expected int >= 1"),
        (["reconstruct", "--checkpoint", "{ckpt}", "--data", "{tmp}", "--out", "{tmp}/x.png"], "no images found"),
    ],
)
def test_user_errors_are_one_line_with_status_2(argv, message, trained, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "dict.pt")
    config = {"in_channels": 3, "image_size": 16, "latent_dim": 4, "hidden_dims": [8, 16]}
    torch.save({"model": {"weights": torch.zeros(1)}, "config": config, "step": 1}, tmp_path / "other.pt")
    argv = [a.format(tmp=tmp_path, ckpt=trained) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err and message in err


def test_resume_with_another_architecture_is_a_one_line_error(trained, capsys):
    argv = ["train", *TINY, "--latent-dim", "8", "--out", str(trained.parent), "--resume", "--steps", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "another architecture: latent_dim=4 there but 8 here" in err


def test_unreadable_image_in_a_worker_is_one_line(folder):
    (folder / "3.png").write_bytes(b"\x89PNG truncated")
    loader = DataLoader(ImageFolder(folder, 16), batch_size=4, num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # the worker's, which the CLI must not print
    line = _one_line(caught.value)
    assert line.startswith(f"{folder / '3.png'}: cannot read image (") and "\n" not in line


def test_python_m_fastvae(tmp_path):
    command = [sys.executable, "-m", "fastvae", "sample", "--checkpoint", str(tmp_path / "none.pt"), "--out", "x.png"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    expected = f"fastvae sample: error: {tmp_path / 'none.pt'}: no such checkpoint"
    assert result.stderr.strip().splitlines()[-1] == expected
