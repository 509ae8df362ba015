"""Ctrl-C held back over a step that must not be cut in the middle, and delivered after it."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold back SIGINT for the block and deliver it after, to the handler there was before."""
    # Only the main thread may set handlers; one installed outside Python could not be put back.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)
