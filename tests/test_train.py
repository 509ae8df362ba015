import inspect
import json
import math
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastvae
from fastvae import _files, checkpoint, ops
from fastvae.cli import main
from fastvae.images import save_grid
from fastvae.reference import kl_divergence
from fastvae.training import evaluation as evaluation_module
from fastvae.training import inputs as inputs_module
from fastvae.training import loop as loop_module
from fastvae.training import options as options_module
from fastvae.training import step as step_module
from fastvae.training.graphed_step import GraphedStep
from fastvae.training.options import resolve_device
from fastvae.training.errors import ConfigError
from fastvae.training.step import beta_at, free_bits_kl

# A model and data small enough for a step to take milliseconds on a CPU.
TINY = [
    "--image-size", "16", "--hidden-dims", "8,16", "--latent-dim", "4", "--batch-size", "8",
    "--train-size", "64", "--eval-size", "16", "--device", "cpu", "--lr", "3e-3",
]
REPO = Path(__file__).resolve().parents[1]
# fastvae's own source files, as a traceback or a warning names them (not a venv that merely
# lives in a folder called fastvae, as the oldest-stack CI's does).
OWN_SOURCE = re.escape(str(Path(fastvae.__file__).resolve().parent)) + r"[/\\][\w/\\]*\.py"


def train(out, *options):
    return main(["train", *TINY, "--out", str(out), *map(str, options)])


def records(out):
    """metrics.jsonl's records, parsed as strictly as a JSON reader other than Python's would."""

    def not_json(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=not_json) for line in lines]


def step_losses(out):
    """The per-step records of metrics.jsonl (not the evaluations)."""
    return [record for record in records(out) if "loss" in record]


def start_run(out, *options, stderr=subprocess.DEVNULL):
    """A run of many steps in a process group of its own, to be stopped by a signal."""
    command = [sys.executable, "-m", "fastvae", "train", *TINY, "--out", str(out), "--steps", "99999", "--every", "5",
               *map(str, options)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def wait_for(process, condition):
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def same_run(out, expected):
    """Assert that the run in ``out`` ended with the metrics and weights of the one in ``expected``."""
    assert (Path(out) / "metrics.jsonl").read_text() == (Path(expected) / "metrics.jsonl").read_text()
    weights = checkpoint.load(Path(out) / "ckpt.pt")["model"]
    for name, tensor in checkpoint.load(Path(expected) / "ckpt.pt")["model"].items():
        assert torch.equal(tensor, weights[name]), name


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
    same_run(tmp_path / "parts", tmp_path / "whole")


def test_a_pre_split_checkpoint_resumes_bit_for_bit(tmp_path):
    # Written by the code before fastvae/train.py became fastvae/training/ (tests/data/README.md says how).
    pre_split = REPO / "tests" / "data" / "pre_split_run"
    options = ("--backend", "reference", "--every", 5, "--beta-schedule", "cyclical", "--beta-period", 6)
    assert train(tmp_path / "whole", "--steps", 10, *options) == 0
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("ckpt.pt", "metrics.jsonl"):
        (parts / name).write_bytes((pre_split / name).read_bytes())
    assert train(parts, "--steps", 10, "--resume", *options) == 0
    same_run(parts, tmp_path / "whole")
    resumed, whole = (checkpoint.load(out / "ckpt.pt") for out in (parts, tmp_path / "whole"))
    assert resumed["step"] == whole["step"] == 10
    assert resumed["args"] == {**whole["args"], "out": str(parts), "resume": True}
    for a, b in zip(resumed["optimizer"]["state"].values(), whole["optimizer"]["state"].values(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert resumed["scaler"] == whole["scaler"]
    assert torch.equal(resumed["rng"]["torch"], whole["rng"]["torch"])


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    killed = tmp_path / "killed"
    process = start_run(killed)
    try:
        wait_for(process, lambda: (killed / "ckpt.pt").exists() and checkpoint.load(killed / "ckpt.pt")["step"] >= 10)
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


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_run_resumes_exactly(tmp_path):
    stopped, log = tmp_path / "stopped", tmp_path / "stderr"
    with open(log, "w") as stderr:
        # With --every 5, a checkpoint at a step that is not a multiple of 5 is SIGTERM's.
        process = start_run(stopped, "--workers", 1, stderr=stderr)
        try:
            wait_for(process, lambda: (stopped / "metrics.jsonl").exists() and len(step_losses(stopped)) >= 12)
        finally:  # to the process group, as Slurm's scancel does: the DataLoader worker gets it too
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    assert process.returncode == 143
    saved = checkpoint.load(stopped / "ckpt.pt")["step"]
    # Every step to the checkpoint is logged (--log-every 10 would leave up to 9 unlogged).
    assert step_losses(stopped)[-1]["step"] == saved
    last_line = log.read_text().strip().splitlines()[-1]  # after tqdm's bar
    assert last_line == (
        f"fastvae train: stopped by SIGTERM after step {saved}, saved in {stopped / 'ckpt.pt'}; continue with --resume"
    )
    assert train(stopped, "--steps", saved + 7, "--every", 5, "--resume") == 0
    assert train(tmp_path / "whole", "--steps", saved + 7, "--every", 5) == 0
    same_run(stopped, tmp_path / "whole")


# `fastvae train` with the garbage collector off, so that only what reference counting frees is
# gone when the run returns; SIGTERM comes to it after 12 steps.
RUN_WITHOUT_GC = """
import gc, multiprocessing, os, signal, sys, threading, time
from pathlib import Path
gc.disable()
from fastvae.cli import main
metrics = Path(sys.argv[sys.argv.index("--out") + 1]) / "metrics.jsonl"
def sigterm_after_12_steps():
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 12:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=sigterm_after_12_steps, daemon=True).start()
status = main(sys.argv[1:])
print(f"status {status}, workers alive {len(multiprocessing.active_children())}", file=sys.stderr)
"""


@pytest.mark.parametrize("steps, status", [(6, 0), (99999, 143)], ids=["done", "stopped-by-sigterm"])
def test_the_workers_are_gone_when_the_run_returns(tmp_path, steps, status):
    # A reference cycle of torch's (see the loop's end) may hold the loop's frame until a garbage
    # collection: its DataLoader workers, left to Python's exit, made the exit wait for them.
    command = [sys.executable, "-c", RUN_WITHOUT_GC, "train", *TINY, "--out", str(tmp_path), "--steps", str(steps),
               "--every", "5", "--workers", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"status {status}, workers alive 0", result.stderr[-3000:]


def test_a_folder_in_use_is_refused_until_its_holder_dies(tmp_path, capsys):
    lock = tmp_path / ".fastvae.lock"
    process = start_run(tmp_path)
    try:
        wait_for(process, lambda: lock.exists() and lock.read_text())
        for options in ((), ("--resume",), ("--overwrite",)):
            assert train(tmp_path, "--steps", 2, *options) == 2, options
            assert capsys.readouterr().err == (
                f"fastvae train: error: --out {tmp_path} is in use by another run (pid {process.pid} on "
                f"{socket.gethostname()}, which holds {lock}); wait for it to end or stop it\n"
            )
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # The lock died with its holder: nothing stale is left to refuse the next run.
    assert train(tmp_path, "--steps", 2, "--resume") == 0
    assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"


def test_without_fcntl_a_run_says_that_it_cannot_hold_its_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_files, "fcntl", None)  # as on Windows
    assert train(tmp_path, "--steps", 1) == 0
    assert capsys.readouterr().err.startswith(f"warning: cannot lock --out {tmp_path} on this platform (no fcntl); ")
    assert not (tmp_path / ".fastvae.lock").exists()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_vae_loss = ops.vae_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss, recon, kl = real_vae_loss(*args, **kwargs)
        if torch.is_grad_enabled():  # training steps, not evaluations
            calls.append(1)
            if len(calls) == 7:
                recon = recon * float("nan")
        return loss, recon, kl

    monkeypatch.setattr(ops, "vae_loss", poisoned)
    assert train(tmp_path, "--steps", 20, "--every", 5, "--log-every", 4) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "loss is nan at step 7" in err[-1] and "ckpt.pt" in err[-1]
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 5
    # Steps 5 and 6, checked with 7, are logged: the history ends where the loss stopped being finite.
    assert [line["step"] for line in step_losses(tmp_path)] == [1, 2, 3, 4, 5, 6]


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


def two_processes(out, *options, program=("-m", "fastvae")):
    """The command and environment of ``fastvae train`` (or a script that runs it: ``program``)
    under torchrun with 2 processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *program, "train", *TINY, "--out", str(out), *map(str, options)]
    return command, {**os.environ, "OMP_NUM_THREADS": "1"}


def run_on_two_processes(out, *options, program=("-m", "fastvae")):
    command, env = two_processes(out, *options, program=program)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    # fastvae's own code warns of nothing deprecated (torch.distributed.nn's all_reduce did).
    assert not re.search(OWN_SOURCE + r":\d+: FutureWarning", result.stderr), result.stderr[-3000:]
    return result


def train_on_two_processes(out, *options):
    result = run_on_two_processes(out, *options)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_give_the_losses_of_one_and_resume_exactly(tmp_path):
    # An evaluation and grids at step 3, on rank 0 only, must not make the ranks' noise drift apart.
    options = ["--every", "3", "--reduction", "sum", "--free-bits", "0.1"]
    assert train(tmp_path / "one", "--steps", 6, *options) == 0
    train_on_two_processes(tmp_path / "two", "--steps", 6, *options)
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

    # Stopped after the evaluation and resumed: rank 0's RNG state, restored on every rank, is
    # every rank's only if evaluation left it alone.
    train_on_two_processes(tmp_path / "parts", "--steps", 3, *options)
    train_on_two_processes(tmp_path / "parts", "--steps", 6, "--resume", *options)
    assert step_losses(tmp_path / "parts") == two


def test_sigterm_stops_every_rank_after_one_step_with_one_checkpoint(tmp_path):
    # torchrun passes SIGTERM on to each rank; they need not get it within the same step.
    command, env = two_processes(tmp_path, "--steps", 99999, "--every", 1000, "--log-every", 2)
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for(process, lambda: (tmp_path / "metrics.jsonl").exists() and len(step_losses(tmp_path)) >= 2)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    saved = checkpoint.load(tmp_path / "ckpt.pt")["step"]
    assert [record["step"] for record in step_losses(tmp_path)] == list(range(1, saved + 1))
    # Said once, by rank 0, the rank that saved; the line may land right after its progress bar.
    said = re.findall(r"fastvae train: stopped[^\r\n]*", (tmp_path / "stderr").read_text())
    assert said == [f"fastvae train: stopped by SIGTERM after step {saved}, saved in {tmp_path / 'ckpt.pt'}; "
                    "continue with --resume"]
    train_on_two_processes(tmp_path, "--steps", saved + 2, "--every", 1000, "--log-every", 2, "--resume")
    assert [record["step"] for record in step_losses(tmp_path)] == list(range(1, saved + 3))


def test_two_processes_scale_each_term_by_its_own_reduction(tmp_path):
    # A summed recon is the sum of the ranks' and a batch-mean KL their mean: DDP's gradient
    # average must weigh the two terms differently.
    options = ["--steps", 3, "--recon-reduction", "sum", "--kl-reduction", "batchmean"]
    assert train(tmp_path / "one", *options) == 0
    train_on_two_processes(tmp_path / "two", *options)
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("loss", "recon", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


def test_a_nan_held_out_loss_stops_every_process_in_one_line(tmp_path):
    # Only rank 0 evaluates: rank 1 must stop with it, not die in its next collective.
    script = tmp_path / "nan_held_out_loss.py"
    script.write_text(
        "import sys\n"
        "from fastvae.training import evaluation\n"
        "from fastvae.cli import main\n"
        "real_evaluate = evaluation.evaluate\n"
        "evaluation.evaluate = lambda *a: {**real_evaluate(*a), 'eval_loss': float('nan')}\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = run_on_two_processes(tmp_path / "run", "--steps", 4, "--every", 2, program=(str(script),))
    assert result.returncode == 1
    assert "fastvae train: held-out loss is nan at step 2; stopped (no checkpoint yet)" in result.stderr
    assert not re.search(f'File "{OWN_SOURCE}"', result.stderr), result.stderr[-3000:]  # no traceback of ours
    assert "gloo" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads by their names in Linux's /proc")
def test_gloo_threads_end_when_the_run_leaves_not_at_exit(tmp_path):
    # Left running into the interpreter's exit, a gloo thread that frees a tensor there aborts the
    # rank; torch.distributed.nn, imported after the process group, kept it (and them) alive.
    script = tmp_path / "count_gloo_threads.py"
    script.write_text(
        "import os, sys\n"
        "from fastvae.cli import main\n"
        "from fastvae.training.distributed import World\n"
        "def gloo_threads():\n"
        "    names = [open(f'/proc/self/task/{task}/comm').read() for task in os.listdir('/proc/self/task')]\n"
        "    return sum('gloo' in name for name in names)\n"
        "real_leave = World.leave\n"
        "def leave(self, leaving):\n"
        "    before = gloo_threads()\n"
        "    real_leave(self, leaving)\n"
        "    print(f'rank {self.rank}: gloo threads {before} -> {gloo_threads()}')\n"
        "World.leave = leave\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = run_on_two_processes(tmp_path / "run", "--steps", 2, "--every", 2, program=(str(script),))
    assert result.returncode == 0, result.stderr[-3000:]
    counts = sorted(re.findall(r"rank (\d): gloo threads (\d+) -> (\d+)", result.stdout))
    assert [rank for rank, _, _ in counts] == ["0", "1"], result.stdout
    for rank, before, after in counts:
        assert int(before) > 0 and int(after) == 0, (rank, before, after)


# `fastvae train` whose rank {failing} meets a bad image in its own part of the data, alone, in
# its third batch.
ONE_RANK_FAILS = """
import os, sys
from fastvae.data import DataError
from fastvae.training.inputs import Inputs
from fastvae.cli import main
real_batches_from = Inputs.batches_from
def batches_from(self, *args):
    batches, kept = real_batches_from(self, *args)
    def failing():
        for n, batch in enumerate(batches, 1):
            if n == 3 and os.environ["RANK"] == "{failing}":
                raise DataError("img_0042.png is not an image")
            yield batch
    return failing(), kept
Inputs.batches_from = batches_from
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("failing", [0, 1])
def test_a_rank_that_fails_alone_says_why_and_the_other_says_it_stopped_with_it(tmp_path, failing):
    # The other rank's next collective breaks as the failing rank leaves: it must say so in one
    # line, not in the 30 lines of gloo's traceback, and not hang.
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS.format(failing=failing))
    result = run_on_two_processes(tmp_path / "run", "--steps", 20, "--every", 10, program=(str(script),))
    assert result.returncode != 0
    # Each line may land right after rank 0's progress bar on one line.
    said = re.findall(r"fastvae train: [^\r\n]*", result.stderr)
    assert sorted(said) == [
        "fastvae train: error: img_0042.png is not an image",
        f"fastvae train: error: rank {failing} stopped with an error (its line says why); stopped with it",
    ], result.stderr[-3000:]
    assert not re.search(f'File "{OWN_SOURCE}"', result.stderr), result.stderr[-3000:]
    assert "gloo" not in result.stderr, result.stderr[-3000:]


def test_a_failed_write_on_rank_0_stops_every_process_in_one_line_each(tmp_path):
    # Rank 0 alone writes the run's files: when its checkpoint does not fit, rank 1 must stop
    # with it, not die in its next collective.
    wide = ["--hidden-dims", "8,256", "--every", "2"]
    train_on_two_processes(tmp_path / "run", "--steps", 2, *wide)
    good = (tmp_path / "run" / "ckpt.pt").read_bytes()
    script = tmp_path / "rank_0_disk_full.py"
    script.write_text(
        "import os, resource, signal, sys\n"
        "from fastvae.cli import main\n"
        "if os.environ['RANK'] == '0':\n"
        "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"    limit = ({len(good) // 2}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, limit)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = run_on_two_processes(tmp_path / "run", "--steps", 6, *wide, "--resume", program=(str(script),))
    assert result.returncode != 0
    # Each rank says it; a line may land right after rank 0's progress bar on one line.
    assert f"fastvae train: error: {tmp_path / 'run' / 'ckpt.pt'}: File too large\n" in result.stderr, result.stderr
    assert ("fastvae train: error: rank 0 could not write the run's files (its line says why); stopped with it\n"
            in result.stderr), result.stderr[-3000:]
    assert not re.search(f'File "{OWN_SOURCE}"', result.stderr), result.stderr[-3000:]
    assert "gloo" not in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == good


def test_training_into_a_run_without_resume_or_overwrite_is_refused(tmp_path, capsys):
    assert train(tmp_path, "--steps", 2, "--every", 2) == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert train(tmp_path, "--steps", 4, "--every", 2) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume" in err and "--overwrite" in err
    assert {name: (tmp_path / name).read_bytes() for name in before} == before

    assert train(tmp_path, "--steps", 3, "--every", 5, "--overwrite") == 0
    assert [line["step"] for line in step_losses(tmp_path)] == [1, 2, 3]
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 3
    assert train(tmp_path, "--steps", 3, "--overwrite", "--resume") == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_overwrite_deletes_the_old_checkpoint_before_training(tmp_path, monkeypatch):
    assert train(tmp_path, "--steps", 2, "--every", 2) == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Interrupted before its first checkpoint, the new run must not leave the old one to --resume.
    monkeypatch.setattr(ops, "vae_loss", interrupted)
    assert train(tmp_path, "--steps", 2, "--overwrite") == 130
    assert not (tmp_path / "ckpt.pt").exists()


def test_weights_made_nan_by_a_finite_loss_are_never_checkpointed(tmp_path, capsys):
    # The command: the first update overflows the weights, the loss of that step is finite.
    assert train(tmp_path, "--steps", 3, "--every", 1, "--beta", 1e38) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after tqdm's bar
    assert err.startswith("fastvae train: encoder.0.weight is not finite after step 1; stopped (no checkpoint yet)")
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_good_checkpoint_is_not_replaced_by_nan_weights(tmp_path, monkeypatch, capsys):
    # The last update overflows one weight: the loss of that step is finite, the weights after it are not.
    real_step = torch.optim.Adam.step
    steps = []

    def overflowing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 10:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", overflowing_step)
    assert train(tmp_path, "--steps", 10, "--every", 5) == 1
    assert step_losses(tmp_path)[-1]["step"] == 10 and math.isfinite(step_losses(tmp_path)[-1]["loss"])
    err = capsys.readouterr().err.strip()
    assert "is not finite after step 10" in err and "the last good checkpoint is" in err
    saved = checkpoint.load(tmp_path / "ckpt.pt")
    assert saved["step"] == 5
    assert all(t.isfinite().all() for t in saved["model"].values() if t.is_floating_point())


def test_a_nan_held_out_loss_is_never_checkpointed(tmp_path, monkeypatch, capsys):
    real_evaluate = evaluation_module.evaluate
    monkeypatch.setattr(evaluation_module, "evaluate", lambda *a: {**real_evaluate(*a), "eval_loss": float("nan")})
    assert train(tmp_path, "--steps", 2, "--every", 2) == 1
    assert "held-out loss is nan at step 2" in capsys.readouterr().err
    assert not (tmp_path / "ckpt.pt").exists()
    # Logged as valid JSON all the same, saying which value was not finite.
    evaluation = records(tmp_path)[-1]
    assert evaluation["eval_loss"] is None and evaluation["non_finite"] == {"eval_loss": "nan"}
    assert math.isfinite(evaluation["eval_recon"]) and "non_finite" not in records(tmp_path)[0]


def test_evaluation_and_grids_leave_the_training_noise_alone(tmp_path):
    # Evaluating every 2 steps or only at the end: the same training steps, bit for bit.
    assert train(tmp_path / "often", "--steps", 6, "--every", 2) == 0
    assert train(tmp_path / "once", "--steps", 6, "--every", 6) == 0
    assert step_losses(tmp_path / "often") == step_losses(tmp_path / "once")


@pytest.mark.parametrize(
    "option, message",
    [
        (("--batch-size", 16), "--batch-size 8 there but 16 here"),
        (("--seed", 3), "--seed 0 there but 3 here"),
        # Adam's saved state would restore the old learning rate: a new one must not be ignored silently.
        (("--lr", 1e-3), "--lr 0.003 there but 0.001 here"),
        (("--train-size", 32), "--train-size 64 there but 32 here"),
        (("--beta", 2), "--beta 1.0 there but 2.0 here"),
        (("--beta-period", 3), "--beta-period 1 there but 3 here"),
        (("--kl-reduction", "sum"), "--kl-reduction None there but sum here"),
    ],
)
def test_resume_with_other_data_or_objective_is_refused(tmp_path, capsys, option, message):
    assert train(tmp_path, "--steps", 4, "--every", 4) == 0
    capsys.readouterr()
    assert train(tmp_path, "--steps", 8, "--resume", *option) == 2
    err = capsys.readouterr().err
    assert "is from another run" in err and message in err, err
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 4
    # What may change: the length, the logging and the backend.
    assert train(tmp_path, "--steps", 6, "--resume", "--every", 3, "--log-every", 2, "--backend", "reference") == 0


def test_resume_keeps_the_default_beta_period_of_the_run_it_continues(tmp_path):
    # A quarter of the first run's 8 steps: extending it to 16 must not stretch the cycle mid-run.
    options = ("--every", 4, "--beta-schedule", "cyclical")
    assert train(tmp_path / "parts", "--steps", 8, *options) == 0
    assert train(tmp_path / "parts", "--steps", 16, "--resume", *options) == 0
    assert train(tmp_path / "whole", "--steps", 16, "--beta-period", 2, *options) == 0
    assert [line["beta"] for line in step_losses(tmp_path / "parts")] == [
        beta_at(s, 1.0, "cyclical", 2) for s in range(16)
    ]
    assert step_losses(tmp_path / "parts") == step_losses(tmp_path / "whole")


def test_resume_from_a_model_only_checkpoint_is_one_line(tmp_path, capsys):
    assert train(tmp_path, "--steps", 2, "--every", 2) == 0
    saved = checkpoint.load(tmp_path / "ckpt.pt")
    checkpoint.save({key: saved[key] for key in ("model", "config", "step")}, tmp_path / "ckpt.pt")
    capsys.readouterr()
    assert train(tmp_path, "--steps", 4, "--resume") == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("holds a model but not the training state to resume from (no optimizer, scaler, rng)")
    assert len(err.strip().splitlines()) == 1


def test_lines_that_are_not_records_are_dropped_on_resume(tmp_path):
    assert train(tmp_path, "--steps", 2, "--every", 2) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n{"note": "added by hand"}\n{"step": "two"}\n')
    assert train(tmp_path, "--steps", 3, "--resume") == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(record.get("step"), int) for record in records)
    assert [record["step"] for record in records if "loss" in record] == [1, 2, 3]


def test_an_overflowed_optimizer_state_is_never_checkpointed(tmp_path, capsys):
    # The gradients' squares overflow Adam's second moment to inf: the update is then 0, the weights
    # and losses stay finite, and training would go on frozen.
    assert train(tmp_path, "--steps", 3, "--every", 1, "--beta", 1e22) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Adam's exp_avg_sq of" in err and "is not finite after step 1; stopped (no checkpoint yet)" in err
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_cuda_device_index_past_the_last_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"--device cuda:7: there are 2 CUDA device\(s\) here"):
        resolve_device("cuda:7")


def test_resume_cuts_the_metrics_back_in_place(tmp_path):
    assert train(tmp_path, "--steps", 4, "--every", 4) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a long history before the checkpoint
        f.writelines(json.dumps({"step": 1, "pad": "x" * 100}) + "\n" for _ in range(2000))
    kept = (tmp_path / "metrics.jsonl").read_bytes()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # and what a killed run logged after it
        f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "loss": 1.0}\n')
    inode = (tmp_path / "metrics.jsonl").stat().st_ino
    assert train(tmp_path, "--steps", 5, "--every", 5, "--resume") == 0
    # The same file, cut where the checkpoint's records end: never copied, so never held whole in
    # memory, and a kill meanwhile cannot lose what it keeps.
    assert (tmp_path / "metrics.jsonl").stat().st_ino == inode
    after = (tmp_path / "metrics.jsonl").read_bytes()
    assert after.startswith(kept) and [record["step"] for record in records(tmp_path)[-2:]] == [5, 5]


def test_a_damaged_line_before_the_checkpoint_is_refused_on_resume(tmp_path, capsys):
    assert train(tmp_path, "--steps", 4, "--every", 4) == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"step": 2, "lo\x00\x00\n'  # as a disk might leave it
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    capsys.readouterr()
    assert train(tmp_path, "--steps", 6, "--resume") == 2
    assert capsys.readouterr().err == (
        f"fastvae train: error: {tmp_path / 'metrics.jsonl'} line 2 is not a JSON record, but records up to the "
        "checkpoint's step 4 follow it; mend or delete that line, then resume again\n"
    )
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines)
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 4


def test_overwrite_deletes_what_the_old_run_wrote_and_nothing_else(tmp_path):
    assert train(tmp_path, "--steps", 4, "--every", 2) == 0
    # Left by a kill during a write, and the user's own files, one named much like ours.
    (tmp_path / "ckpt.pt.12345.0123abcd.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "samples_best.png").write_bytes(b"keep me")
    assert train(tmp_path, "--steps", 3, "--every", 3, "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".fastvae.lock", "ckpt.pt", "interpolations_000003.png", "metrics.jsonl", "notes.txt",
        "reconstructions_000003.png", "samples_000003.png", "samples_best.png",
    ]


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    # As two runs, or two `fastvae sample`, writing the same grid at once.
    target = tmp_path / "grid.png"

    def interrupted_by_another_writer(f):
        _files.write_atomically(target, lambda g: g.write(b"the other's"))
        f.write(b"this one's")

    _files.write_atomically(target, interrupted_by_another_writer)
    assert target.read_bytes() == b"this one's"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def fastvae_with_file_size_limit(limit, *argv):
    """``fastvae *argv`` in a process whose writes stop at ``limit`` bytes a file, as on a full disk."""
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
        "from fastvae.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", code, *map(str, argv)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def train_with_file_size_limit(limit, out, *options):
    return fastvae_with_file_size_limit(limit, "train", *TINY, "--out", out, *options)


def test_a_checkpoint_is_renamed_into_place_durably(tmp_path, monkeypatch):
    # fsync of the file makes its bytes durable, fsync of the folder the rename.
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    checkpoint.save({"step": 1}, tmp_path / "ckpt.pt")
    assert synced == [False, True]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "ckpt.pt").mkdir()
    with pytest.raises(IsADirectoryError):
        checkpoint.save({"step": 1}, tmp_path / "ckpt.pt")
    (tmp_path / "grid.png").mkdir()
    with pytest.raises(IsADirectoryError):
        save_grid(torch.zeros(1, 3, 4, 4), tmp_path / "grid.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "grid.png"]



def test_a_checkpoint_write_that_fails_is_one_line_and_keeps_the_last_good_one(tmp_path):
    # Wide enough that the checkpoint (about 1.5 MB) is far larger than the grids and the metrics.
    wide = ["--hidden-dims", "8,256", "--every", "2"]
    assert train(tmp_path, "--steps", 2, *wide) == 0
    good = (tmp_path / "ckpt.pt").read_bytes()
    # The next checkpoint's write fails halfway.
    result = train_with_file_size_limit(len(good) // 2, tmp_path, *wide, "--steps", 4, "--resume")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"fastvae train: error: {tmp_path / 'ckpt.pt'}: File too large"
    assert (tmp_path / "ckpt.pt").read_bytes() == good
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def _drop(mapping, key):
    del mapping[key]


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda c: c["model"].__setitem__("fc_mu.weight", torch.zeros(3)),
         "its model cannot be restored (Error(s) in loading state_dict for VAE:"),
        (lambda c: _drop(c["model"], "fc_mu.bias"), "its model cannot be restored (Error(s) in loading state_dict"),
        (lambda c: c.__setitem__("optimizer", {"state": {}, "param_groups": []}),
         "its optimizer state cannot be restored (loaded state dict has a different number of parameter groups)"),
        (lambda c: c["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(3)),
         "its optimizer state cannot be restored (exp_avg of parameter 0 has shape (3,) but the parameter has (8, 3, 4, 4))"),
        (lambda c: c.__setitem__("optimizer", [1, 2]), "its optimizer state cannot be restored ("),
        (lambda c: c.__setitem__("rng", {"torch": torch.zeros(3)}), "its RNG state cannot be restored ("),
        (lambda c: c.__setitem__("rng", {}), "its RNG state cannot be restored (no 'torch' in it)"),
        (lambda c: c.__setitem__("rng", "seed 0"), "its RNG state cannot be restored ("),
        (lambda c: c.__setitem__("args", ["--lr", "3e-3"]), "not a fastvae checkpoint (its args should be a dict, got list)"),
        (lambda c: c.__setitem__("config", None), "not a fastvae checkpoint (its config should be a dict, got NoneType)"),
    ],
)
def test_resume_from_a_malformed_checkpoint_is_one_line(tmp_path, capsys, spoil, message):
    assert train(tmp_path, "--steps", 2, "--every", 2) == 0
    saved = checkpoint.load(tmp_path / "ckpt.pt")
    spoil(saved)
    checkpoint.save(saved, tmp_path / "ckpt.pt")
    spoiled = (tmp_path / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert train(tmp_path, "--steps", 4, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"fastvae train: error: {tmp_path / 'ckpt.pt'}"), err
    assert message in err, err
    assert (tmp_path / "ckpt.pt").read_bytes() == spoiled


def _image_folder(folder, indices):
    folder.mkdir(exist_ok=True)
    for i in indices:
        Image.fromarray(np.full((20, 20, 3), 4 * i, np.uint8)).save(folder / f"{i:02d}.png")


def test_resume_on_a_changed_image_folder_is_refused_unless_allowed(tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "run"
    _image_folder(images, range(40))  # 36 to train on, 4 held out
    assert train(out, "--data", images, "--steps", 2, "--every", 2) == 0
    saved = (out / "ckpt.pt").read_bytes()
    _image_folder(images, range(40, 60))  # 56 and 4
    capsys.readouterr()
    assert train(out, "--data", images, "--steps", 4, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"fastvae train: error: {out / 'ckpt.pt'} trained on other images: since then, in --data {images}, "
        "it held 40 images then and 60 now; pass --allow-changed-data to resume on them anyway"
    )
    assert (out / "ckpt.pt").read_bytes() == saved
    # As many images, one of them rewritten.
    for i in range(40, 60):
        (images / f"{i:02d}.png").unlink()
    os.utime(images / "07.png", ns=(0, 0))
    assert train(out, "--data", images, "--steps", 4, "--resume") == 2
    assert "images were added, removed, rewritten or touched (40 now)" in capsys.readouterr().err
    assert train(out, "--data", images, "--steps", 4, "--resume", "--allow-changed-data") == 0
    assert checkpoint.load(out / "ckpt.pt")["step"] == 4
    # The new checkpoint records the folder as it is now: a plain resume goes on.
    assert train(out, "--data", images, "--steps", 6, "--resume") == 0


def test_a_checkpoint_without_the_data_record_still_resumes(tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "run"
    _image_folder(images, range(20))
    assert train(out, "--data", images, "--steps", 2, "--every", 2) == 0
    older = checkpoint.load(out / "ckpt.pt")
    del older["data"]  # as written before fastvae recorded the images
    torch.save(older, out / "ckpt.pt")
    capsys.readouterr()
    assert train(out, "--data", images, "--steps", 4, "--resume") == 0
    assert "does not record the images it trained on" in capsys.readouterr().out
    assert checkpoint.load(out / "ckpt.pt")["step"] == 4


def test_compiled_training_follows_eager_and_resumes_either_way(tmp_path):
    from torch._dynamo.utils import counters

    assert train(tmp_path / "eager", "--steps", 4, "--every", 2) == 0
    counters.clear()
    assert train(tmp_path / "compiled", "--steps", 2, "--every", 2, "--compile") == 0
    # The forward with the loss and Adam's step are graphs: --compile did compile the step.
    assert counters["stats"]["unique_graphs"] >= 2
    compiled = checkpoint.load(tmp_path / "compiled" / "ckpt.pt")
    eager = checkpoint.load(tmp_path / "eager" / "ckpt.pt")
    assert list(compiled["model"]) == list(eager["model"])  # no torch.compile prefixes
    assert compiled["optimizer"]["state"].keys() == eager["optimizer"]["state"].keys()
    # An eager run resumes the compiled one, and a compiled run an eager one.
    assert train(tmp_path / "compiled", "--steps", 4, "--every", 2, "--resume") == 0
    assert train(tmp_path / "mixed", "--steps", 2, "--every", 2) == 0
    assert train(tmp_path / "mixed", "--steps", 4, "--every", 2, "--resume", "--compile") == 0
    # The same noise (eager random ops); inductor's fused kernels round differently than eager's,
    # by a few float32 ulps a step here.
    expected = step_losses(tmp_path / "eager")
    for run in ("compiled", "mixed"):
        losses = step_losses(tmp_path / run)
        assert [line["step"] for line in losses] == [1, 2, 3, 4]
        for a, b in zip(expected, losses):
            for key in ("loss", "recon", "kl"):
                assert b[key] == pytest.approx(a[key], rel=1e-4), (run, a["step"], key)


def test_data_kept_on_the_device_gives_the_loader_run_and_resumes_mid_epoch_exactly(tmp_path, monkeypatch, capsys):
    assert train(tmp_path / "loader", "--steps", 10, "--every", 10) == 0
    assert "data kept on" not in capsys.readouterr().out
    # A CPU stands in for a GPU with room for the data.
    monkeypatch.setattr(inputs_module, "data_fits_on", lambda *args: True)
    assert train(tmp_path / "kept", "--steps", 10, "--every", 10) == 0  # 8 batches an epoch: 2 epochs
    assert "data kept on cpu" in capsys.readouterr().out
    # The same batches in the same order; shapes rendered many at a time may differ in an ulp.
    for a, b in zip(step_losses(tmp_path / "loader"), step_losses(tmp_path / "kept"), strict=True):
        for key in ("loss", "recon", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    # Resumed in the second epoch, it takes up the order where it stopped.
    assert train(tmp_path / "parts", "--steps", 9, "--every", 9) == 0
    assert train(tmp_path / "parts", "--steps", 10, "--every", 10, "--resume") == 0
    assert step_losses(tmp_path / "parts") == step_losses(tmp_path / "kept")



def test_compile_cuts_the_training_step_into_three_graphs_at_zero_grad_and_backward(tmp_path, monkeypatch):
    # What --help and the README say --compile is. A change of torch or of the step that joins or
    # splits graphs shows here.
    steps = []
    real_compile_step = step_module.compile_step

    def keep(step, mode, **options):
        steps.append(step)
        return real_compile_step(step, mode, **options)

    monkeypatch.setattr(step_module, "compile_step", keep)
    assert train(tmp_path, "--steps", 1, "--every", 1) == 0
    explained = torch._dynamo.explain(steps[0])(torch.rand(8, 3, 16, 16), torch.tensor(1.0))
    assert (explained.graph_count, explained.graph_break_count) == (3, 2)
    assert "Optimizer.zero_grad" in explained.break_reasons[0].reason
    forward, adam, losses = ({str(node.target) for node in graph.graph.nodes} for graph in explained.graphs)
    assert any("conv2d" in target for target in forward) and any("batch_norm" in target for target in forward)
    assert any("addcdiv" in target for target in adam) and not any("conv2d" in target for target in adam)
    assert any("stack" in target for target in losses) and len(losses) < 20


def test_help_says_what_compile_and_cuda_graph_are(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "It is three graphs, not one: the forward with the loss, Adam's update and the stack of the losses" in text
    assert "Optimizer.zero_grad, which Dynamo does not trace, and at Tensor.backward" in text
    assert "--cuda-graph capture the whole step" in text


@pytest.mark.parametrize(
    "options, environment, line",
    [
        (("--compile", "reduce-overhead"), {}, "--cuda-graph with --compile reduce-overhead: that mode replays CUDA "
         "graphs of its own, which cannot be captured inside the step's; use --compile default"),
        (("--compile", "max-autotune"), {}, "--cuda-graph with --compile max-autotune: that mode replays CUDA "
         "graphs of its own, which cannot be captured inside the step's; use --compile default"),
        (("--amp", "fp16"), {}, "--cuda-graph with --amp fp16: GradScaler decides on the host whether each step is "
         "skipped, which a replay cannot; use --amp bf16, which needs no scaler"),
        ((), {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "--cuda-graph runs in one process, not 2: the "
         "graph would hold the collectives of DDP; run without torchrun"),
    ],
)
def test_cuda_graph_with_what_a_replay_cannot_do_is_refused_in_one_line(tmp_path, capsys, monkeypatch, options,
                                                                       environment, line):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert train(tmp_path, "--steps", 2, "--cuda-graph", *options) == 2
    assert capsys.readouterr().err == f"fastvae train: error: {line}\n"
    assert not (tmp_path / "ckpt.pt").exists()


def test_cuda_graph_on_a_cpu_is_refused_in_one_line():
    command = [sys.executable, "-m", "fastvae", "train", *TINY, "--out", "unused", "--cuda-graph"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "fastvae train: error: --cuda-graph needs a CUDA device, not cpu\n"


def test_cuda_graph_needs_the_training_set_kept_on_the_device(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(options_module, "check_graphable", lambda *args: None)  # a CPU stands in for a GPU
    assert train(tmp_path, "--steps", 2, "--cuda-graph") == 2
    assert capsys.readouterr().err == (
        "fastvae train: error: --cuda-graph needs the training set kept on cpu, and its 64 images of 16x16 would "
        "take 0.000183 GiB, more than 25% of its free memory; lower --train-size or run without --cuda-graph\n"
    )


def test_the_graphed_step_in_the_loop_gives_the_eager_run_bit_for_bit_and_resumes_either_way(tmp_path, monkeypatch,
                                                                                            capsys):
    # A CPU stands in for a GPU with room for the data, and --cuda-graph runs its uncaptured twin
    # there: the static buffers, the ring of losses the loop reads at its checks (every 3 steps,
    # and at the evaluations every 5) and Adam's state set for the step, through the CLI.
    monkeypatch.setattr(options_module, "check_graphable", lambda *args: None)
    monkeypatch.setattr(inputs_module, "data_fits_on", lambda *args: True)
    options = ("--every", 5, "--log-every", 3, "--beta-schedule", "cyclical", "--beta-period", 4)
    assert train(tmp_path / "eager", "--steps", 10, *options) == 0
    capsys.readouterr()
    assert train(tmp_path / "graphed", "--steps", 10, *options, "--cuda-graph") == 0
    assert "one CUDA graph a step" in capsys.readouterr().out
    expected = step_losses(tmp_path / "eager")
    assert step_losses(tmp_path / "graphed") == expected
    eager, graphed = (checkpoint.load(tmp_path / run / "ckpt.pt") for run in ("eager", "graphed"))
    assert graphed.keys() == eager.keys() and graphed["args"].keys() == eager["args"].keys()
    for name, value in eager["model"].items():
        assert torch.equal(graphed["model"][name], value), name
    # Each resumes the other, and a checkpoint of a GPU's graphed run (capturable Adam) resumes on a CPU.
    assert train(tmp_path / "graphed_then_eager", "--steps", 5, *options, "--cuda-graph") == 0
    assert train(tmp_path / "graphed_then_eager", "--steps", 10, *options, "--resume") == 0
    assert train(tmp_path / "eager_then_graphed", "--steps", 5, *options) == 0
    assert train(tmp_path / "eager_then_graphed", "--steps", 10, *options, "--resume", "--cuda-graph") == 0
    assert train(tmp_path / "from_a_gpu", "--steps", 5, *options) == 0
    saved = checkpoint.load(tmp_path / "from_a_gpu" / "ckpt.pt")
    for group in saved["optimizer"]["param_groups"]:
        group["capturable"] = True
    checkpoint.save(saved, tmp_path / "from_a_gpu" / "ckpt.pt")
    assert train(tmp_path / "from_a_gpu", "--steps", 10, *options, "--resume") == 0
    for run in ("graphed_then_eager", "eager_then_graphed", "from_a_gpu"):
        assert step_losses(tmp_path / run) == expected, run


@pytest.mark.parametrize(
    "options, rows",
    [
        (("--steps", 6, "--every", 3, "--log-every", 7), 3),  # --every is the shorter period
        (("--steps", 6, "--every", 100, "--log-every", 4), 4),
        (("--steps", 5, "--every", 100, "--log-every", 2**16 - 1), 5),  # the whole run between two checks
    ],
)
def test_the_graphed_steps_ring_has_a_row_for_each_of_the_most_steps_between_two_checks(tmp_path, monkeypatch,
                                                                                      options, rows):
    # A CPU stands in for a GPU, as above: the ring is made at the first step, in the graph's pool on a GPU.
    monkeypatch.setattr(options_module, "check_graphable", lambda *args: None)
    monkeypatch.setattr(inputs_module, "data_fits_on", lambda *args: True)
    made = []

    class Recorded(GraphedStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(step_module, "GraphedStep", Recorded)
    assert train(tmp_path / "graphed", *options, "--cuda-graph") == 0
    (graphed,) = made
    assert graphed.history.shape == (rows, 3)
    # No row was written over before its check read it.
    assert train(tmp_path / "eager", *options) == 0
    assert step_losses(tmp_path / "graphed") == step_losses(tmp_path / "eager")


def test_the_loop_fits_on_one_screen_and_reads_top_to_bottom():
    # The house style (STYLE.md section 4): run() reads as nanoGPT's loop does, and what is not the
    # loop's own reading (the save at a check, the SIGTERM stop) is called by name.
    source = inspect.getsource(loop_module.run)
    assert len(source.splitlines()) <= 80
    sections = re.findall(r"# ---- (.+?) -+$", source, re.MULTILINE)
    assert sections == ["config", "data", "model and optimizer", "resume", "the loop"]
