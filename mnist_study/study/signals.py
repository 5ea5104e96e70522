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
_deferred = {"depth": 0, "pending": False}  # inside signals_deferred(): hold the raise


def on_stop_signal(signum, frame) -> None:
    """Ctrl-C, SIGTERM or SIGHUP: raise at once, and remember: Python drops an exception
    raised while a destructor runs, so the worker also checks at every evaluation. A
    second signal (Ctrl-C reaches the workers, then their parent passes it on) must not
    interrupt the recording of the first."""
    if _stopped_by:
        return
    _stopped_by.append(signum)
    if _deferred["depth"]:
        _deferred["pending"] = True
        return
    raise Interrupted(signal.Signals(signum).name, signum)


@contextlib.contextmanager
def signals_deferred():
    """A stop signal inside the block raises when the block ends, not within it.

    For writes that hold a lock across files: Optuna's journal lock is a symlink taken
    and released in several system calls, and an exception raised between them either
    leaves the lock behind (every worker then stalls for its 30 s grace period) or makes
    Optuna's own cleanup fail (FileNotFoundError instead of Interrupted: seen in CI).
    """
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
    if not _deferred["depth"] and _deferred["pending"]:
        _deferred["pending"] = False
        stop_if_signalled()


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
    _deferred["pending"] = False
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
