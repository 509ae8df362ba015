"""SIGTERM, which schedulers send some time before they kill: the run stops after its step with a
checkpoint. (SIGINT, Ctrl-C, stops it at once, from the last checkpoint.)"""

from __future__ import annotations

import signal


class SigtermCatcher:
    """Notes SIGTERM instead of dying of it, while entered; ``caught`` says whether it came."""

    def __enter__(self) -> SigtermCatcher:
        self._signums: list[int] = []
        self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._signums.append(signum))
        return self

    @property
    def caught(self) -> bool:
        return bool(self._signums)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def ignore_sigterm(worker_id: int) -> None:
    """A DataLoader's worker_init_fn. A scheduler may signal the whole process group (Slurm's
    scancel does). A worker that died of it would end the run with an error before its checkpoint;
    the run stops its workers itself, after the checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
