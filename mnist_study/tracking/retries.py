"""How long MLflow's client retries a tracking server that fails, and the line that says it
is retrying: without it, a server that is down or answering 500 means half a minute of
silence before the one-line error. Imports no MLflow (the command's --help stays fast)."""

from __future__ import annotations

import logging
import os
import sys

# Given up on within about half a minute, not MLflow's 7 retries of up to 2 minutes
# each; set in the environment to wait longer.
REMOTE_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class FirstRetrySaid(logging.Handler):
    """Says the first retry of this process in one line; the later ones are silent."""

    said = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.said or not str(record.msg).startswith("Incremented Retry"):
            return
        url, retry = record.args
        last = retry.history[-1] if retry.history else None
        if last is None:
            why = "no answer"
        else:
            why = f"HTTP {last.status}" if last.status else type(last.error).__name__
        retries = os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        print(
            f"mnist-study: the MLflow server failed a request ({why} on {url.split('?')[0]}); "
            f"retrying up to {retries} times (MLFLOW_HTTP_REQUEST_MAX_RETRIES)",
            file=sys.stderr,
            flush=True,
        )
        FirstRetrySaid.said = True


def bound_remote_retries() -> None:
    """Bound MLflow's HTTP retries (for this process and those it starts) and say the
    first one. urllib3 logs each retry at DEBUG on its own logger, which goes nowhere else."""
    for name, value in REMOTE_RETRIES.items():
        os.environ.setdefault(name, value)
    retry_log = logging.getLogger("urllib3.util.retry")
    if not any(isinstance(h, FirstRetrySaid) for h in retry_log.handlers):
        retry_log.addHandler(FirstRetrySaid())
        retry_log.setLevel(logging.DEBUG)
        retry_log.propagate = False
