"""The signals that stop a study's process (Ctrl-C, SIGTERM, SIGHUP): raised as
Interrupted where the worker can record its unit, and remembered so that a signal that
lands inside a destructor is not lost."""

from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM, SIGHUP, or the worker's parent process gone: stop, keep what is
    done. `signum`: the signal, if one stopped it."""

    def __init__(self, reason: str, signum: int | None = None):
        super().__init__(reason)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, the shell's convention; 1 without a signal."""
        return 128 + self.signum if self.signum else 1


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


_stopped_by: list[int] = []  # the signal that stopped this process, once


def on_stop_signal(signum, frame) -> None:
    """Ctrl-C, SIGTERM or SIGHUP: raise at once, and remember: Python drops an exception
    raised while a destructor runs, so the worker also checks at every evaluation. A
    second signal (Ctrl-C reaches the workers, then their parent passes it on) must not
    interrupt the recording of the first."""
    if _stopped_by:
        return
    _stopped_by.append(signum)
    raise Interrupted(signal.Signals(signum).name, signum)


def stop_if_signalled() -> None:
    if _stopped_by:
        raise Interrupted(signal.Signals(_stopped_by[0]).name, _stopped_by[0])


@contextlib.contextmanager
def stopping_on_signals():
    """Within the block, Ctrl-C, SIGTERM and SIGHUP raise Interrupted (in the main
    thread; other threads cannot take signals, and run until the unit ends)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, on_stop_signal)
    _stopped_by.clear()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
