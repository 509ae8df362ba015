"""A signal noted instead of acted on while a block runs: SIGTERM for the training loop, which
stops after its step, and Ctrl-C held back over a step that must not be cut in the middle."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class HeldSignal:
    """While entered, counts ``signum`` in ``received`` instead of passing it to the handler there
    was before; on exit that handler is back. With ``let_through_after`` N, the signal after the
    first N reaches that handler at once, and it stays for the rest of the block.

    It holds nothing (``holding`` is False, and the signal goes where it went) outside the main
    thread, the only one that may set handlers, and where the handler there was is one installed
    outside Python (signal.getsignal gives None), which could not be put back.
    """

    def __init__(self, signum: int, let_through_after: int | None = None) -> None:
        self.signum = signum
        self.let_through_after = let_through_after
        self.received = 0

    def __enter__(self) -> HeldSignal:
        self.received = 0
        self.holding = (threading.current_thread() is threading.main_thread()
                        and signal.getsignal(self.signum) is not None)
        if self.holding:
            self._previous = signal.signal(self.signum, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        self.received += 1
        if self.let_through_after is not None and self.received > self.let_through_after:
            signal.signal(signum, self._previous)
            signal.raise_signal(signum)  # runs the handler now, here: Ctrl-C's KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.holding:
            signal.signal(self.signum, self._previous)


@contextlib.contextmanager
def ctrl_c_deferred(*, second_stops: bool = True) -> Iterator[None]:
    """Hold back a first SIGINT for the block and deliver it after, to the handler there was
    before. With ``second_stops``, a second one reaches that handler at once, as the usual "press
    Ctrl-C again to stop now" expects (for Python's default handler, a KeyboardInterrupt from
    where the block was); without, every one is held, and one delivered after."""
    ctrl_c = HeldSignal(signal.SIGINT, let_through_after=1 if second_stops else None)
    try:
        with ctrl_c:
            yield
    finally:
        if ctrl_c.received and not (second_stops and ctrl_c.received > 1):
            signal.raise_signal(signal.SIGINT)
