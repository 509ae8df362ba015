"""fastvae._signals: a signal noted instead of acted on over a block (the training loop's SIGTERM),
and Ctrl-C held back over a write, a second one stopping it at once."""

import signal
import threading

import pytest

from fastvae._signals import HeldSignal, ctrl_c_deferred
from fastvae.training.sigterm import SigtermCatcher


def test_a_held_signal_is_counted_and_its_handler_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with HeldSignal(signal.SIGTERM) as held:
        assert held.received == 0
        for _ in range(3):
            signal.raise_signal(signal.SIGTERM)  # would end this process, unheld
        assert held.received == 3
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_sigterm_catcher_says_whether_sigterm_came():
    before = signal.getsignal(signal.SIGTERM)
    with SigtermCatcher() as sigterm:
        assert not sigterm.caught
        signal.raise_signal(signal.SIGTERM)
        assert sigterm.caught
    assert signal.getsignal(signal.SIGTERM) is before
    with SigtermCatcher() as again:  # each entry starts afresh
        assert not again.caught


def test_a_held_signal_after_the_first_n_reaches_the_handler_at_once():
    calls = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        with HeldSignal(signal.SIGUSR1, let_through_after=2) as held:
            signal.raise_signal(signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR1)
            assert calls == [] and held.received == 2
            signal.raise_signal(signal.SIGUSR1)
            assert calls == [signal.SIGUSR1] and held.received == 3
            signal.raise_signal(signal.SIGUSR1)  # the handler's own from now on
            assert calls == [signal.SIGUSR1] * 2 and held.received == 3
    finally:
        signal.signal(signal.SIGUSR1, before)


@pytest.mark.parametrize(
    ("second_stops", "presses", "pressed_and_went_on"),
    [
        (True, 1, [1]),  # the first takes effect after the block
        (True, 2, [1]),  # the second at once
        (False, 3, [1, 2, 3]),  # each one held, where a second must not stop the block
    ],
)
def test_ctrl_c_deferred(second_stops, presses, pressed_and_went_on):
    went_on = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_deferred(second_stops=second_stops):
            for press in range(1, presses + 1):
                signal.raise_signal(signal.SIGINT)
                went_on.append(press)
    assert went_on == pressed_and_went_on
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_ignored_before_the_block_stays_ignored_in_it():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ctrl_c_deferred():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# Each use of HeldSignal: the Ctrl-C deferral of a write, and the training loop's SIGTERM.
HOLDERS = pytest.mark.parametrize("holder", [ctrl_c_deferred, SigtermCatcher], ids=["ctrl_c_deferred", "sigterm"])


@HOLDERS
def test_no_signal_is_held_outside_the_main_thread(holder):
    # There signal.signal raises ValueError: the block runs as it is.
    outcome = []

    def block():
        try:
            with holder():
                outcome.append("ran")
        except BaseException as exc:  # noqa: BLE001  (reported to the test below)
            outcome.append(exc)

    thread = threading.Thread(target=block)
    thread.start()
    thread.join()
    assert outcome == ["ran"]


@HOLDERS
def test_no_signal_is_held_over_a_handler_installed_outside_python(monkeypatch, holder):
    # signal.getsignal gives None for one: signal.signal could not put it back.
    def refused(*args):
        raise AssertionError("a handler installed outside Python would be lost")

    monkeypatch.setattr(signal, "getsignal", lambda signum: None)
    monkeypatch.setattr(signal, "signal", refused)
    with holder():
        pass
