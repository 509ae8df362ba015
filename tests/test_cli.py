import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastvae import checkpoint
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
        (["train", "--batch-size", "0"], "expected int >= 1 and < 2**63, got '0'"),
        (["bench", "--rounds", "0"], "argument --rounds: expected int >= 1 and < 2**63, got '0'"),
        (["bench", "--rounds", "99999999999999999999999"], "argument --rounds: expected int >= 1 and < 2**63"),
        (["train", "--lr", "0"], "expected float > 0"),
        (["train", "--seed", "-3"], "expected int >= 0"),
        (["train", "--free-bits", "-1"], ">= 0"),
        (["train", "--device", "tpu"], "not a device name"),
        (["train", "--amp", "fp16", "--device", "cpu"], "needs a CUDA device"),
        (["train", "--data", "{tmp}/missing"], "no such folder"),
        (["train", "--data", "{tmp}"], "no images found"),
        (["train", *TINY, "--batch-size", "128"], "fewer than one batch"),
        (["sample", "--checkpoint", "{tmp}/missing.pt", "--out", "{tmp}/x.png"], "no such checkpoint"),
        (["sample", "--checkpoint", "{tmp}/garbage.pt", "--out", "{tmp}/x.png"], "not a fastvae checkpoint, or one that"),
        (["sample", "--checkpoint", "{tmp}/zip.pt", "--out", "{tmp}/x.png"],
         "not a readable checkpoint (PytorchStreamReader failed reading zip archive: "),
        (["sample", "--checkpoint", "{tmp}/dict.pt", "--out", "{tmp}/x.png"], "not a fastvae checkpoint"),
        (["sample", "--checkpoint", "{tmp}/other.pt", "--out", "{tmp}/x.png"], "its model cannot be rebuilt"),
        (["sample", "--checkpoint", "{ckpt}", "--n", "0", "--out", "{tmp}/x.png"], "expected int >= 1"),
        (["reconstruct", "--checkpoint", "{ckpt}", "--data", "{tmp}", "--out", "{tmp}/x.png"], "no images found"),
        (["sample", "--checkpoint", "{ckpt}", "--out", "{tmp}"], "is a folder; name an image file"),
        (["reconstruct", "--checkpoint", "{ckpt}", "--out", "{tmp}"], "is a folder; name an image file"),
        (["sample", "--checkpoint", "{ckpt}", "--out", "{tmp}/x.xyz"], "cannot tell the image format from .xyz"),
        (["sample", "--checkpoint", "{ckpt}", "--out", "{tmp}/x"], "cannot tell the image format from no extension"),
        (["sample", "--checkpoint", "{ckpt}", "--out", "{tmp}/garbage.pt/x.png"], "garbage.pt is a file, not a folder"),
        (["sample", "--checkpoint", "{ckpt}", "--seed", str(2**64), "--out", "{tmp}/x.png"], "expected int >= 0 and < 2**64"),
        (["train", "--seed", str(2**64)], "expected int >= 0 and < 2**64"),
        (["train", "--image-size", str(2**40)], "power of two from 16 to 4096"),
        (["train", *TINY, "--out", "{tmp}/garbage.pt"], "is a file, not a folder"),
        (["train", *TINY, "--out", "{tmp}/garbage.pt/run"], "cannot write there (Not a directory)"),
        (["train", *TINY, "--out", "{tmp}/ckpt_folder", "--overwrite"], "ckpt.pt is not a file"),
        (["train", *TINY, "--out", "{tmp}/ckpt_folder", "--resume"], "ckpt.pt is not a file"),
        (["train", *TINY, "--out", "{tmp}/metrics_folder"], "metrics.jsonl is not a file"),
        (["train", *TINY, "--out", "{ckpt_dir}"], "holds a run (ckpt.pt, metrics.jsonl): pass --resume"),
        (["train", *TINY, "--out", ""], 'expected a folder, got ""'),
        # Sizes that cannot fit, refused before anything is allocated.
        (["train", *TINY, "--latent-dim", "65535", "--hidden-dims", "65535,65535", "--out", "{tmp}/run"],
         "--latent-dim 65535 and --hidden-dims 65535,65535 at --image-size 16: a model of 3.44e+11 parameters and its "
         "training state would take about 5.12e+03 GiB, more than the"),
        (["train", *TINY, "--train-size", str(10**15), "--out", "{tmp}/run"],
         "--train-size 1000000000000000: the order of an epoch of that many shapes would take about 4.47e+07 GiB"),
        (["train", *TINY, "--eval-size", str(10**15), "--out", "{tmp}/run"],
         "--eval-size 1000000000000000: every evaluation would go through that many held-out images; at most 1048576"),
        (["sample", "--checkpoint", "{ckpt}", "--n", str(10**12), "--out", "{tmp}/x.png"],
         "--n 1000000000000: a grid of 1000000000000 images of 16x16 would take about 2.29e+07 GiB, more than the"),
        (["reconstruct", "--checkpoint", "{ckpt}", "--n", str(10**8), "--out", "{tmp}/x.png"],
         "--n 100000000: a grid of 200000000 images of 16x16 would take about 4.58e+03 GiB"),
    ],
)
def test_user_errors_are_one_line_with_status_2(argv, message, trained, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "dict.pt")
    config = {"in_channels": 3, "image_size": 16, "latent_dim": 4, "hidden_dims": [8, 16]}
    checkpoint.save({"model": {"weights": torch.zeros(1)}, "config": config, "step": 1}, tmp_path / "other.pt")
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04 not a zip archive")
    (tmp_path / "ckpt_folder" / "ckpt.pt").mkdir(parents=True)
    (tmp_path / "metrics_folder" / "metrics.jsonl").mkdir(parents=True)
    argv = [a.format(tmp=tmp_path, ckpt=trained, ckpt_dir=trained.parent) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err and message in err
    assert not list(tmp_path.rglob("*.tmp"))


class _Writes:
    """A stderr that keeps its writes apart."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass


def test_a_line_on_stderr_is_one_write(tmp_path, monkeypatch):
    # Under torchrun the ranks share stderr: another rank's line can land between two writes of one.
    (tmp_path / "ckpt.pt").mkdir()
    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(["train", *TINY, "--out", str(tmp_path), "--resume"]) == 2
    assert stderr.writes == [f"fastvae train: error: {tmp_path / 'ckpt.pt'} is not a file; move it out of the way\n"]


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_that_holds_code_is_refused_in_one_short_line(trained, tmp_path, capsys):
    torch.save({"model": _RunsCode(), "config": {}, "step": 1}, tmp_path / "code.pt")
    assert main(["sample", "--checkpoint", str(tmp_path / "code.pt"), "--out", str(tmp_path / "x.png")]) == 2
    out, err = capsys.readouterr()
    assert "this must never run" not in out
    assert err == f"fastvae sample: error: {tmp_path / 'code.pt'}: not a fastvae checkpoint, or one that holds code (refused to load it)\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; see the /sys case")
def test_train_into_a_read_only_folder_is_one_line(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 2
    finally:
        tmp_path.chmod(0o700)
    assert "cannot write there (Permission denied)" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's /sys, where even root cannot make files")
def test_an_out_that_cannot_be_written_is_one_line(trained, capsys):
    assert main(["train", *TINY, "--out", "/sys/kernel/fastvae-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastvae train: error: --out /sys/kernel/fastvae-run: cannot write there (") and err.count("\n") == 1
    # Found only when the grid is written: after the work, but still one line.
    assert main(["sample", "--checkpoint", str(trained), "--out", "/sys/kernel/fastvae.png", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == "fastvae sample: error: /sys/kernel/fastvae.png: Permission denied\n"  # not its temporary


@pytest.mark.parametrize("suffix, file_format", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP")])
def test_sample_writes_the_format_of_the_extension(trained, tmp_path, suffix, file_format):
    out = tmp_path / f"samples{suffix}"
    assert main(["sample", "--checkpoint", str(trained), "--n", "4", "--out", str(out), "--device", "cpu"]) == 0
    with Image.open(out) as image:
        assert image.format == file_format and image.size == (2 * 18 + 2, 2 * 18 + 2)


def test_resume_with_another_architecture_is_a_one_line_error(trained, capsys):
    argv = ["train", *TINY, "--latent-dim", "8", "--out", str(trained.parent), "--resume", "--steps", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "another architecture: latent_dim=4 there but 8 here" in err


def test_resume_with_another_recon_names_the_one_the_checkpoint_trained_with(trained, capsys):
    # An "mse" checkpoint has no recon in its config: it was trained with the default.
    argv = ["train", *TINY, "--recon", "l1", "--out", str(trained.parent), "--resume", "--steps", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("another architecture: recon='mse' (the default) there but 'l1' here")


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


def test_python_m_fastvae_bench_loads_its_command():
    # Only the chosen command's module is imported: --help is where a wrong module path shows.
    result = subprocess.run([sys.executable, "-m", "fastvae", "bench", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fastvae bench [-h] [--device DEVICE] [--rounds ROUNDS] [--full]")
    assert "Time the fused ops and the training step against eager PyTorch" in result.stdout
