"""DataLoader worker processes: how many a run may start, and how each one behaves when the run
is signalled or dies, so that the run alone decides how it ends and no worker outlives it."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
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


def start(loader: DataLoader) -> Iterator:
    """``iter(loader)``, which forks its workers, with Ctrl-C held back until they are started,
    a second one too.

    A KeyboardInterrupt raised in Python's at-fork hooks, which run in the forking process, is
    reported there and dropped: the run would go on as if Ctrl-C had never come. And a worker gets
    to init_worker, which ignores it, only some time after its fork.
    """
    with ctrl_c_deferred(second_stops=False):
        return iter(loader)


def init_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn`` for the run's loaders.

    A terminal's Ctrl-C and a scheduler's SIGTERM reach the whole process group, workers included
    (Slurm's scancel signals the group too). A worker that died of either would end the run in the
    DataLoader's traceback instead of its own way out (interrupted, or a checkpoint first): the
    workers ignore both, and the run stops them itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()


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
