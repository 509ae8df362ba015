"""How a training run ends when it is stopped from outside: Ctrl-C, with DataLoader workers or in
the middle of a checkpoint's write, and a kill of the run that must take its workers with it."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastvae import _files, _workers, checkpoint
from test_train import REPO, TINY, same_run, start_run, train, wait_for
from test_train_options import usable_cpus

# Two where the machine lets a run start two (--workers is at most the usable CPUs).
WORKERS = min(2, usable_cpus())


def children(pid):
    """The pids of the live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _state(int(entry.name)) not in (None, "Z"):
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
    return found


def _state(pid):
    """The process state letter of ``pid`` (Z for a zombie), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def saved_step(out):
    path = Path(out) / "ckpt.pt"
    return checkpoint.load(path)["step"] if path.exists() else 0


def test_ctrl_c_with_workers_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    run, log = tmp_path / "run", tmp_path / "stderr"
    with open(log, "w") as stderr:
        process = start_run(run, "--workers", WORKERS, stderr=stderr)
        try:
            wait_for(process, lambda: saved_step(run) >= 5 and len(children(process.pid)) >= WORKERS)
            # A terminal signals every process of the group, in no set order: here the workers
            # get it first, and the run must not die of their absence before its own Ctrl-C.
            for worker in children(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGINT)
            time.sleep(1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert process.returncode == 130, text[-3000:]
    assert text.replace("\r", "\n").strip().splitlines()[-1] == "fastvae train: interrupted", text[-3000:]
    assert "Traceback" not in text
    saved = saved_step(run)
    assert saved >= 5 and saved % 5 == 0
    assert train(run, "--steps", saved + 5, "--every", 5, "--resume") == 0
    assert train(tmp_path / "whole", "--steps", saved + 5, "--every", 5) == 0
    same_run(run, tmp_path / "whole")


# `fastvae train` whose first torch.save is interrupted by Ctrl-C after its first few writes: the
# signal lands in the middle of a checkpoint's write.
CTRL_C_WHILE_SAVING = """
import itertools, os, signal, sys, torch
real_save, writes = torch.save, itertools.count(1)
class Interrupted:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        written = self.f.write(data)
        if next(writes) == 3:
            # The run is alone in its process group (its session), so this is a terminal's Ctrl-C,
            # its handler run at once: two presses are not merged into one pending signal.
            for _ in range(int(os.environ["CTRL_C_PRESSES"])):
                signal.raise_signal(signal.SIGINT)
        return written
    def __getattr__(self, name):
        return getattr(self.f, name)
torch.save = lambda payload, f, **kwargs: real_save(payload, Interrupted(f), **kwargs)
from fastvae.cli import main
sys.exit(main(sys.argv[1:]))
"""


# One Ctrl-C: the write it landed in is finished, and the run stops right after it. Two: the run
# stops at once, and the checkpoint before stays.
@pytest.mark.parametrize(("presses", "saved"), [(1, 6), (2, 4)])
def test_ctrl_c_while_a_checkpoint_is_written_is_one_line_and_keeps_a_whole_checkpoint(tmp_path, presses, saved):
    run = tmp_path / "run"
    assert train(run, "--steps", 4, "--every", 2) == 0
    command = [sys.executable, "-c", CTRL_C_WHILE_SAVING, "train", *TINY, "--out", str(run), "--steps", "8",
               "--every", "2", "--resume"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, start_new_session=True,
                            env={**os.environ, "CTRL_C_PRESSES": str(presses)})
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stderr.replace("\r", "\n").strip().splitlines()[-1] == "fastvae train: interrupted"
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
    assert not list(run.glob("*.tmp"))
    assert saved_step(run) == saved
    assert train(run, "--steps", 8, "--every", 2, "--resume") == 0
    assert train(tmp_path / "whole", "--steps", 8, "--every", 2) == 0
    same_run(run, tmp_path / "whole")


# `fastvae train` that gets Ctrl-C, to its whole process group, as it forks its first DataLoader worker.
CTRL_C_AT_THE_FIRST_FORK = """
import os, signal, sys
forks = []
def ctrl_c_at_the_first_fork():
    if not forks:
        forks.append("first")
        # The group holds only the run yet: this is a terminal's Ctrl-C, its handler run at once.
        for _ in range(int(os.environ["CTRL_C_PRESSES"])):
            signal.raise_signal(signal.SIGINT)
os.register_at_fork(before=ctrl_c_at_the_first_fork)
from fastvae.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_while_the_workers_start_is_one_line_not_lost(tmp_path, presses):
    # Python runs its at-fork hooks in the forking process; a KeyboardInterrupt raised in one is
    # reported there and dropped, and the run would go on as if Ctrl-C had never come. So there
    # a second Ctrl-C is held back too.
    assert train(tmp_path, "--steps", 5, "--every", 5) == 0
    command = [sys.executable, "-c", CTRL_C_AT_THE_FIRST_FORK, "train", *TINY, "--out", str(tmp_path),
               "--steps", "10", "--every", "5", "--resume", "--workers", str(WORKERS)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, start_new_session=True,
                            env={**os.environ, "CTRL_C_PRESSES": str(presses)})
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stderr.replace("\r", "\n").strip().splitlines()[-1] == "fastvae train: interrupted"
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
    assert saved_step(tmp_path) == 5


# `fastvae train` whose DataLoader workers get SIGTERM (as a scheduler's, to the process group)
# just after torch's worker installs its own SIGTERM handler, which dies, and before init_worker.
SIGTERM_AS_A_WORKER_STARTS = """
import os, signal, sys
from torch.utils.data._utils import signal_handling
torch_handlers = signal_handling._set_worker_signal_handlers
def then_sigterm():
    torch_handlers()
    os.kill(os.getpid(), signal.SIGTERM)
signal_handling._set_worker_signal_handlers = then_sigterm
from fastvae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_as_a_worker_starts_waits_for_it_to_be_ignored(tmp_path):
    command = [sys.executable, "-c", SIGTERM_AS_A_WORKER_STARTS, "train", *TINY, "--out", str(tmp_path),
               "--steps", "10", "--every", "5", "--workers", str(WORKERS)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert saved_step(tmp_path) == 10


def test_workers_are_started_only_with_their_init():
    loader = torch.utils.data.DataLoader(range(4), num_workers=1)
    with pytest.raises(ValueError, match="the loader's worker_init_fn should be init_worker, got None"):
        _workers.start(loader)


# A worker's batch handed over by multiprocessing's resource sharer, and the run hanging up on it
# mid-way, as a run stopped by Ctrl-C while it takes a batch does: it connects to the worker's
# sharer and closes before it reads the sharer's challenge, which resets the connection there
# ("unread"), or after, which the sharer sees as the end of the connection ("read").
RUN_HANGS_UP_ON_A_BATCH = """
import os, socket, sys, time
from multiprocessing import resource_sharer
from fastvae import _workers
if sys.argv[1] == "worker":
    _workers.init_worker(0)
read_end, _ = os.pipe()
resource_sharer.DupFd(read_end)  # shares it: the sharer's thread starts listening
run = socket.socket(socket.AF_UNIX)
run.connect(resource_sharer._resource_sharer._address)
time.sleep(0.5)  # the challenge is sent
if sys.argv[2] == "read":
    run.recv(4096)
run.close()
time.sleep(0.5)  # the sharer's thread reports what it got
sys.excepthook(ValueError, ValueError("any other error"), None)
"""


@pytest.mark.parametrize(("challenge", "error"), [("unread", "ConnectionResetError"), ("read", "EOFError")])
@pytest.mark.parametrize("process", ["worker", "other"])
def test_a_worker_says_nothing_when_the_run_hangs_up_on_a_batch(process, challenge, error):
    result = subprocess.run([sys.executable, "-c", RUN_HANGS_UP_ON_A_BATCH, process, challenge], cwd=REPO,
                            capture_output=True, text=True, timeout=60, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # Outside a worker the sharer's report is Python's usual traceback: what the worker silences.
    assert ("resource_sharer.py" in result.stderr) == (process == "other"), result.stderr[-3000:]
    assert (f"\n{error}" in result.stderr) == (process == "other"), result.stderr[-3000:]
    assert "ValueError: any other error" in result.stderr


def test_ctrl_c_during_an_atomic_write_takes_effect_once_the_file_is_in_place(tmp_path):
    def interrupted(f):
        f.write(b"first half, ")
        os.kill(os.getpid(), signal.SIGINT)
        f.write(b"second half")

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _files.write_atomically(tmp_path / "file", interrupted)
    assert (tmp_path / "file").read_bytes() == b"first half, second half"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_during_an_atomic_write_stops_it_and_keeps_the_old_file(tmp_path):
    def interrupted_twice(f):
        f.write(b"first half, ")
        signal.raise_signal(signal.SIGINT)
        f.write(b"second half")
        signal.raise_signal(signal.SIGINT)
        f.write(b", never written")

    (tmp_path / "file").write_bytes(b"the old file")
    with pytest.raises(KeyboardInterrupt):
        _files.write_atomically(tmp_path / "file", interrupted_twice)
    assert (tmp_path / "file").read_bytes() == b"the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_inside_torch_save_is_a_keyboard_interrupt_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    # torch's zip writer turns the KeyboardInterrupt raised in its write into its own RuntimeError.
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"model": {}, "config": {}, "step": 1}, path)
    real_save, writes = torch.save, []

    class Interrupting:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            writes.append(len(data))
            if len(writes) in (2, 3):
                signal.raise_signal(signal.SIGINT)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(torch, "save", lambda payload, f, **kwargs: real_save(payload, Interrupting(f), **kwargs))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"model": {"weight": torch.ones(1000)}, "config": {}, "step": 2}, path)
    assert len(writes) == 3
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_killed_run_takes_its_workers_with_it(tmp_path):
    process = start_run(tmp_path, "--workers", WORKERS)
    try:
        wait_for(process, lambda: saved_step(tmp_path) >= 5 and len(children(process.pid)) >= WORKERS)
        workers = children(process.pid)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    # At once: not after the seconds that a worker waiting for its next batch takes to notice.
    deadline = time.monotonic() + 2
    while any(_state(pid) not in (None, "Z") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in workers if _state(pid) not in (None, "Z")]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left
