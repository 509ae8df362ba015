"""How a training run ends other than done: each maps to one line and an exit status in fastvae.cli."""

from __future__ import annotations


class ConfigError(ValueError):
    """Options that cannot make a run (bad sizes, a device or backend that is not there)."""


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class RankZeroFailed(RuntimeError):
    """Under DDP, rank 0, the one that writes the run's files, could not (it says why): the other
    ranks stop with it rather than in their next collective."""


class RankFailed(RuntimeError):
    """Under DDP, other ranks (``ranks``) stopped with errors of their own (their lines say why),
    alone: this one stops with them in one line, not with the traceback of the collective they left."""

    def __init__(self, ranks: list[int]) -> None:
        if len(ranks) == 1:
            super().__init__(f"rank {ranks[0]} stopped with an error (its line says why); stopped with it")
        else:
            listed = ", ".join(map(str, ranks))
            super().__init__(f"ranks {listed} stopped with errors (their lines say why); stopped with them")
        self.ranks = ranks


class Stopped(Exception):
    """A signal stopped the run after a checkpoint; the process should exit with 128 + ``signum``,
    the status of a process the signal killed, so that a scheduler sees what it expects. The
    ``message``, None for a process with nothing to add (a DDP rank that did not save), is its line."""

    def __init__(self, message: str | None, signum: int) -> None:
        super().__init__(message)
        self.message, self.signum = message, signum
