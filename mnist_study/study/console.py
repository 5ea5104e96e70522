"""What a worker prints: one line per run with the study's progress and time left, its
evaluation lines unless --quiet, and each line tagged with the worker's number when
several share the console."""

from __future__ import annotations

import time


class Console:
    def __init__(self, index: int, workers: int, quiet: bool):
        self.index, self.workers, self.quiet = index, workers, quiet
        self.started = time.time()
        self.said_waiting = 0.0

    def say(self, text: str, force: bool = False) -> None:
        """A line of output (`force`: even with --quiet); with several workers, tagged
        with this one's number."""
        if self.workers > 1 and not text.startswith(("[w", "worker ")):
            text = f"[w{self.index}] {text}"
        if force or not self.quiet:
            print(text, flush=True)

    def progress(self, done: int, total: int, left: float | None) -> str:
        """`[w0 12/576 done | 4m10s, ~1h20m left]`: this worker's time so far and the
        study's time left (`left` seconds; unknown until a unit has measured its pace)."""
        elapsed = minutes(time.time() - self.started)
        return f"[w{self.index} {done}/{total} done | {elapsed}" + (
            f", ~{minutes(left)} left]" if left is not None else "]"
        )

    def waiting(self, lines: list[str]) -> None:
        """Once a minute, the units on other hosts that this worker waits for."""
        if lines and time.time() - self.said_waiting > 60:
            for line in lines:
                self.say(f"worker {self.index}: {line}", force=True)
            self.said_waiting = time.time()


def minutes(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def shown_params(params: dict) -> str:
    """`lr=0.00123, seed=0`: a unit's point as a progress line shows it."""
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )
