"""SIGTERM, which schedulers send some time before they kill: the run stops after its step with a
checkpoint. (SIGINT, Ctrl-C, stops it at once, from the last checkpoint.)"""

from __future__ import annotations

import signal

from fastvae._signals import HeldSignal


class SigtermCatcher(HeldSignal):
    """Notes SIGTERM instead of dying of it, while entered; ``caught`` says whether it came."""

    def __init__(self) -> None:
        super().__init__(signal.SIGTERM)

    @property
    def caught(self) -> bool:
        return bool(self.received)
