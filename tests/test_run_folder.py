"""What a run finds in its --out folder when it starts: the metrics it appends to, the
temporaries that earlier runs killed mid-write left there, and a checkpoint older than the digest."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastvae import _files, checkpoint
from fastvae.cli import build_parser
from fastvae.model import VAE
from fastvae.training import run_folder
from test_checkpoint import OLD
from test_train import TINY, run_on_two_processes, train
from test_train_options import fastvae


@pytest.mark.parametrize("constant", ["NaN", "-Infinity"])
def test_a_non_json_number_before_the_checkpoint_is_refused_on_resume(tmp_path, constant):
    assert train(tmp_path, "--steps", 4, "--every", 4) == 0
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    # Python's json reads and writes these; the file promises JSON, which has no such numbers.
    lines[1] = f'{{"step": 2, "loss": {constant}, "recon": 1.0, "kl": 1.0, "beta": 1.0}}\n'
    metrics.write_text("".join(lines))
    result = fastvae("train", *TINY, "--out", tmp_path, "--steps", 6, "--resume")
    assert result.returncode == 2
    assert result.stderr == (
        f"fastvae train: error: {metrics} line 2 is not a JSON record, but records up to the checkpoint's step 4 "
        "follow it; mend or delete that line, then resume again\n"
    )
    assert metrics.read_text() == "".join(lines)
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 4


def gone_pid():
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_a_run_removes_the_temporaries_that_killed_runs_left_once_it_holds_the_folder(tmp_path):
    assert train(tmp_path, "--steps", 2, "--every", 2) == 0
    dead = gone_pid()
    stale = [f"ckpt.pt.{dead}.0123abcd.tmp", f"samples_000330.png.{dead}.89abcdef.tmp",
             f"metrics.jsonl.{dead}.00000000.tmp"]
    kept = [
        "notes.txt", "ckpt.pt.tmp", f"ckpt.pt.{dead}.xyz.tmp", f"holiday.png.{dead}.0123abcd.tmp",
        f"samples_best.png.{dead}.0123abcd.tmp",
        # A live process's (a `fastvae sample --out` into the folder, say): it is still writing it.
        f"samples_000002.png.{os.getpid()}.0123abcd.tmp",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"half a file")
    (tmp_path / f"reconstructions_000004.png.{dead}.0123abcd.tmp").mkdir()  # not a file: not ours

    held = _files.hold(tmp_path / ".fastvae.lock")  # as another run would
    try:
        refused = fastvae("train", *TINY, "--out", tmp_path, "--steps", 4, "--resume")
    finally:
        held.close()
    assert refused.returncode == 2 and "is in use by another run" in refused.stderr
    assert all((tmp_path / name).exists() for name in stale)  # not the refused run's to remove

    result = fastvae("train", *TINY, "--out", tmp_path, "--steps", 4, "--every", 2, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not [name for name in stale if (tmp_path / name).exists()]
    assert all((tmp_path / name).read_bytes() == b"half a file" for name in kept)
    assert (tmp_path / f"reconstructions_000004.png.{dead}.0123abcd.tmp").is_dir()
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 4


def undigested_run(out, *, spoil=False):
    """A run of 2 steps in ``out`` whose checkpoint is as fastvae wrote it before the digest (with
    ``spoil``, also holding a key no fastvae wrote: damaged)."""
    assert train(out, "--steps", 2, "--every", 2) == 0
    older = checkpoint.load(out / "ckpt.pt")  # its digest checked and removed
    torch.save({**older, **({"junk": 1} if spoil else {})}, out / "ckpt.pt")
    return older


def resume(out, *, say):
    """run_folder.resume of the run in ``out`` into a new model, as --resume does on a rank that says
    what it finds (``say``) or not: the CheckpointWarnings it gave, the step, the model and its Adam."""
    args = build_parser("train").parse_args(["train", *TINY, "--out", str(out), "--steps", "4", "--resume"])
    model = VAE(3, 16, 4, (8, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, _ = run_folder.resume(out / "ckpt.pt", args, model, optimizer, scaler, None, 4, say=say)
    said = [str(w.message) for w in caught if issubclass(w.category, checkpoint.CheckpointWarning)]
    return said, step, model, optimizer


@pytest.mark.parametrize("say", [True, False])
def test_only_the_rank_that_says_warns_of_a_checkpoint_without_a_digest(tmp_path, say):
    older = undigested_run(tmp_path)
    said, step, model, optimizer = resume(tmp_path, say=say)
    assert said == ([f"{tmp_path / 'ckpt.pt'} {OLD}"] if say else [])
    # Every rank loads it, quiet or not.
    assert step == 2
    for name, tensor in older["model"].items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert optimizer.state_dict()["state"].keys() == older["optimizer"]["state"].keys()


@pytest.mark.parametrize("say", [True, False])
def test_a_quiet_rank_still_refuses_a_damaged_checkpoint_without_a_digest(tmp_path, say):
    undigested_run(tmp_path, spoil=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"damaged, or not a fastvae checkpoint \(it holds junk\)"):
        resume(tmp_path, say=say)


def test_under_torchrun_a_checkpoint_without_a_digest_is_warned_of_once(tmp_path):
    undigested_run(tmp_path)
    result = run_on_two_processes(tmp_path, "--steps", 4, "--every", 2, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    warned = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert warned == [f"fastvae train: warning: {tmp_path / 'ckpt.pt'} {OLD}"], result.stderr[-3000:]
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 4
