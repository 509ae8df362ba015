"""SIGTERM, which schedulers send some time before they kill: the run stops after its step with a
checkpoint. (SIGINT, Ctrl-C, stops it at once, from the last checkpoint.)"""

from __future__ import annotations

import signal
from pathlib import Path

from fastvae._signals import HeldSignal
from fastvae.training.errors import Stopped


class SigtermCatcher(HeldSignal):
    """Notes SIGTERM instead of dying of it, while entered; ``caught`` says whether it came."""

    def __init__(self) -> None:
        super().__init__(signal.SIGTERM)

    @property
    def caught(self) -> bool:
        return bool(self.received)


def stopped(step: int, ckpt_path: Path, *, say: bool) -> Stopped:
    """The end of a run that SIGTERM stopped after ``step``, saved in ``ckpt_path``: its line is said
    (``say``) by rank 0, which saved; the other ranks exit with it, quietly."""
    message = f"stopped by SIGTERM after step {step}, saved in {ckpt_path}; continue with --resume"
    return Stopped(message if say else None, signal.SIGTERM)
