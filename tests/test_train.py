import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae import checkpoint, ops
from fastvae.cli import main
from fastvae.reference import kl_divergence
from fastvae.train import beta_at, free_bits_kl

# A model and data small enough for a step to take milliseconds on a CPU.
TINY = [
    "--image-size", "16", "--hidden-dims", "8,16", "--latent-dim", "4", "--batch-size", "8",
    "--train-size", "64", "--eval-size", "16", "--device", "cpu", "--lr", "3e-3",
]
REPO = Path(__file__).resolve().parents[1]


def train(out, *options):
    return main(["train", *TINY, "--out", str(out), *map(str, options)])


def step_losses(out):
    """The per-step records of metrics.jsonl (not the evaluations)."""
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def test_loss_falls_and_outputs_are_written(tmp_path):
    assert train(tmp_path, "--steps", 60, "--every", 30) == 0
    losses = [line["loss"] for line in step_losses(tmp_path)]
    assert [line["step"] for line in step_losses(tmp_path)] == list(range(1, 61))
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    evaluations = [json.loads(line) for line in lines if "eval_loss" in line]
    assert [e["step"] for e in evaluations] == [30, 60]
    assert evaluations[1]["eval_loss"] < evaluations[0]["eval_loss"]
    assert 0 <= evaluations[1]["active_units"] <= 4
    for kind in ("reconstructions", "samples", "interpolations"):
        assert (tmp_path / f"{kind}_000060.png").is_file()
    ckpt = checkpoint.load(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 60
    assert ckpt["config"] == {"in_channels": 3, "image_size": 16, "latent_dim": 4, "hidden_dims": [8, 16]}


def test_trains_on_an_image_folder_for_whole_epochs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):  # 2 held out, 18 to train on: 2 batches of 8 an epoch
        Image.fromarray(np.full((24, 20, 3), 10 * i, np.uint8)).save(images / f"{i:02d}.png")
    assert train(tmp_path / "run", "--data", images, "--epochs", 3, "--every", 100) == 0
    assert [line["step"] for line in step_losses(tmp_path / "run")] == list(range(1, 7))
    assert checkpoint.load(tmp_path / "run" / "ckpt.pt")["step"] == 6


def test_resume_gives_the_same_run_bit_for_bit(tmp_path):
    options = ("--every", 5, "--beta-schedule", "cyclical", "--beta-period", 6)
    assert train(tmp_path / "whole", "--steps", 15, *options) == 0
    assert train(tmp_path / "parts", "--steps", 10, *options) == 0
    assert train(tmp_path / "parts", "--steps", 15, "--resume", *options) == 0
    assert step_losses(tmp_path / "parts") == step_losses(tmp_path / "whole")
    whole = checkpoint.load(tmp_path / "whole" / "ckpt.pt")
    parts = checkpoint.load(tmp_path / "parts" / "ckpt.pt")
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "fastvae", "train", *TINY, "--out", str(killed), "--steps", "99999", "--every", "5"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((killed / "ckpt.pt").exists() and checkpoint.load(killed / "ckpt.pt")["step"] >= 10):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = checkpoint.load(killed / "ckpt.pt")["step"]
    # The resumed run logs from step saved + 1: the steps before come from the killed run.
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # as if killed in the middle of writing a line
    assert train(killed, "--steps", saved + 5, "--every", 5, "--resume") == 0
    assert train(tmp_path / "whole", "--steps", saved + 5, "--every", 5) == 0
    assert step_losses(killed) == step_losses(tmp_path / "whole")


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_vae_loss = ops.vae_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss, recon, kl = real_vae_loss(*args, **kwargs)
        if torch.is_grad_enabled():  # training steps, not evaluations
            calls.append(1)
            if len(calls) == 7:
                loss = loss * float("nan")
        return loss, recon, kl

    monkeypatch.setattr(ops, "vae_loss", poisoned)
    assert train(tmp_path, "--steps", 20, "--every", 5, "--log-every", 4) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "loss is nan at step 7" in err[-1] and "ckpt.pt" in err[-1]
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 5


def test_beta_schedules():
    assert [beta_at(s, 2.0, "constant", 4) for s in (0, 9)] == [2.0, 2.0]
    assert [beta_at(s, 2.0, "linear", 4) for s in (0, 1, 4, 9)] == [0.0, 0.5, 2.0, 2.0]
    assert [beta_at(s, 2.0, "cyclical", 4) for s in (0, 1, 2, 3, 4, 5)] == [0.0, 1.0, 2.0, 2.0, 0.0, 1.0]


@pytest.mark.parametrize("reduction, factor", [("sum", 6), ("batchmean", 1), ("mean", 1 / 5)])
def test_free_bits_kl_floors_each_dimension(reduction, factor):
    torch.manual_seed(0)
    mu = torch.randn(6, 5, dtype=torch.float64)
    mu[:, :2] *= 0.01  # two nearly collapsed dimensions, below the floor
    logvar = (0.1 * torch.randn(6, 5, dtype=torch.float64)).requires_grad_()
    floor = 0.25
    per_dim = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).detach().mean(0).numpy()
    expected = factor * sum(max(float(d), floor) for d in per_dim)

    options = dict(reduction=reduction, global_batch=6, distributed=False, backend="reference")
    kl = free_bits_kl(mu, logvar, floor=floor, **options)
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    assert (per_dim[:2] < floor).all() and (per_dim[2:] > floor).all()
    (grad,) = torch.autograd.grad(kl, logvar)
    assert (grad[:, :2] == 0).all() and (grad[:, 2:] != 0).all()
    unfloored = free_bits_kl(mu, logvar, floor=0.0, **options)
    assert unfloored.item() == pytest.approx(kl_divergence(mu, logvar, reduction=reduction).item(), rel=1e-9)


def test_two_processes_give_the_losses_of_one(tmp_path):
    options = [*TINY, "--steps", "6", "--every", "6", "--reduction", "sum", "--free-bits", "0.1"]
    assert main(["train", *options, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastvae", "train", *options, "--out", str(tmp_path / "two")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        for key in ("loss", "recon", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    # BatchNorm's running statistics were kept over the global batch too.
    a = checkpoint.load(tmp_path / "one" / "ckpt.pt")["model"]
    b = checkpoint.load(tmp_path / "two" / "ckpt.pt")["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
