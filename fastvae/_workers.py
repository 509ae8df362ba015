"""DataLoader worker processes: how many a run may start, and how each one behaves when the run
is signalled or dies, so that the run alone decides how it ends and no worker outlives it."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import traceback
from multiprocessing import resource_sharer
from typing import Iterator

from torch.utils.data import DataLoader

from fastvae._signals import ctrl_c_deferred

# prctl's option (linux/prctl.h): the signal the kernel sends a process when its parent dies.
_PR_SET_PDEATHSIG = 1


def usable_cpus() -> int:
    """The CPUs this process may run on: the most workers a run starts (--workers), since more
    only compete for the same CPUs and each holds a copy of the process."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# What a worker ignores (see init_worker), and must not die of before it does.
_RUN_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start(loader: DataLoader) -> Iterator:
    """``iter(loader)``, which forks its workers, with Ctrl-C held back until they are started,
    a second one too, and Ctrl-C and SIGTERM blocked in each worker until init_worker ignores them
    (``loader``'s worker_init_fn must be init_worker).

    A KeyboardInterrupt raised in Python's at-fork hooks, which run in the forking process, is
    reported there and dropped: the run would go on as if Ctrl-C had never come. And a worker gets
    to init_worker only some time after its fork: torch's worker first installs its own SIGTERM
    handler, which dies, so that a scheduler's SIGTERM to the group meanwhile would end the run
    in the DataLoader's traceback.
    """
    if loader.num_workers and loader.worker_init_fn is not init_worker:
        raise ValueError(f"the loader's worker_init_fn should be init_worker, got {loader.worker_init_fn!r}")
    with ctrl_c_deferred(second_stops=False), _blocked(_RUN_SIGNALS):
        return iter(loader)


@contextlib.contextmanager
def _blocked(signums: set[int]) -> Iterator[None]:
    # A forked process starts with its forking thread's signal mask; a signal blocked here stays
    # pending until unblocked, and then reaches this process's handlers as usual.
    if not hasattr(signal, "pthread_sigmask"):  # Windows, where workers are not forked
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def init_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn`` for the run's loaders.

    A terminal's Ctrl-C and a scheduler's SIGTERM reach the whole process group, workers included
    (Slurm's scancel signals the group too). A worker that died of either would end the run in the
    DataLoader's traceback instead of its own way out (interrupted, or a checkpoint first): the
    workers ignore both, and the run stops them itself.
    """
    for signum in _RUN_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked since the fork (see start); one pending is dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _RUN_SIGNALS)
    sys.excepthook = _quiet_when_the_run_hangs_up(sys.excepthook)
    _die_with_parent()


def _quiet_when_the_run_hangs_up(excepthook):
    """``excepthook``, silent for a connection that the run broke while taking a batch from the
    worker.

    A worker hands each batch's shared memory to the run over a connection to multiprocessing's
    resource sharer, a thread of the worker that reports its errors through sys.excepthook. A run
    stopped (Ctrl-C) while it takes one breaks that connection: reset (ConnectionResetError) if
    it left the sharer's challenge unread, closed (EOFError) if it read it, cut inside a message
    (OSError) or under a send (BrokenPipeError). The worker would print a traceback after the
    run's last line, and in the middle of it. The run has ended; it alone says how.
    """

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, (OSError, EOFError)) and any(
            frame.f_code.co_filename == resource_sharer.__file__ for frame, _ in traceback.walk_tb(tb)
        ):
            return
        excepthook(exc_type, exc, tb)

    return hook


def _die_with_parent() -> None:
    # DataLoader's own watchdog notices a dead parent only between batches, seconds later, and not
    # at all while a worker is blocked writing a batch the parent will never read. Linux can kill
    # the worker the moment its parent dies, kill -9 included (strictly, when the parent's thread
    # that started it ends: the one iterating the loader).
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os._exit(1)
