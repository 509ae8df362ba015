"""What a run finds in its --out folder when it starts: the metrics it appends to, and the
temporaries that earlier runs killed mid-write left there."""

import os
import subprocess
import sys

import pytest

from fastvae import _files, checkpoint
from test_train import TINY, train
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
