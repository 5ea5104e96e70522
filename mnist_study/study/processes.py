"""Worker processes of one study command: starting them, and noticing at once when one
dies (out of memory, kill -9) so that its trial is redone."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.forkserver
import signal
from collections.abc import Callable

from mnist_study.errors import WorkerRefused
from mnist_study.study.signals import STOP_SIGNALS, Interrupted

REFUSED = 2
"""A worker's exit code when it refused to go on (its reason printed in one line): the
whole command stops with it, and nothing is reaped (the store may be gone)."""


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code > 128 and code - 128 in {int(s) for s in STOP_SIGNALS}:
        return f"was stopped by {signal.Signals(code - 128).name}"
    return f"exited with code {code} (traceback above)"


def start_fork_server(module: str) -> multiprocessing.context.BaseContext:
    """The fork server, started (once) importing `module` and what every worker needs
    beyond it, while this process goes on with its checks: seconds of CPU paid once
    instead of in each worker."""
    ctx = multiprocessing.get_context("forkserver")
    preload = [
        module,
        "torch._dynamo",  # torch.optim imports it at a worker's first optimizer (~3 s)
        "mlflow.store.tracking.sqlalchemy_store",  # MLflow imports it at a first query (~2 s)
    ]
    ctx.set_forkserver_preload(preload)
    multiprocessing.forkserver.ensure_running()
    return ctx


def run_workers(
    target: Callable, args: tuple, n: int, reap: Callable[[], None]
) -> list[tuple[int, str]]:
    """Run target(*args, index) in n worker processes until all have ended. They are
    forked from one fork server that imported target's module (torch, MLflow, Optuna)
    once: a worker starts in a fraction of a second, not the seconds of a fresh import
    each, and never inherits this process's open stores or threads as a fork of it would.
    A signal to this process (SIGINT, SIGTERM, SIGHUP; a terminal's Ctrl-C, a supervisor,
    `timeout`) stops the whole command: it is passed on to every worker as SIGTERM, each
    records its trial as FAIL and its run as KILLED, and Interrupted is raised. A worker
    that ends on its own (a signal meant for it alone, kill -9, out of memory, a crash)
    is that worker's death: seen at once on its sentinel, collected, named in a line,
    and `reap()` marks its trial FAIL so that the others redo it. Returns (index, how)
    for each worker that died.
    """
    ctx = start_fork_server(target.__module__)
    alive = {i: ctx.Process(target=target, args=(*args, i), name=f"worker-{i}") for i in range(n)}
    stopped: list[int] = []
    refused = False

    def stop_all() -> None:
        for p in alive.values():
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker records its trial and exits

    def on_signal(signum, frame) -> None:
        stopped.append(signum)
        stop_all()

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    for p in alive.values():
        p.start()
    deaths = []
    try:
        while alive:
            ready = multiprocessing.connection.wait([p.sentinel for p in alive.values()])
            for i, p in list(alive.items()):
                if p.sentinel not in ready:
                    continue
                p.join()
                del alive[i]
                if p.exitcode == 0 or stopped or refused:
                    continue
                if p.exitcode == REFUSED:  # its one-line reason is on stderr already
                    refused = True
                    stop_all()
                    continue
                how = describe_exit(p.exitcode)
                deaths.append((i, how))
                print(f"worker {i} {how}; its unit was marked FAIL and redone", flush=True)
                reap()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        reap()  # a worker stopped before it could record its trial: recorded here
        raise Interrupted(signal.Signals(stopped[0]).name, stopped[0])
    if refused:
        raise WorkerRefused()
    return deaths
