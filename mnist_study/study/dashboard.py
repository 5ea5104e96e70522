"""optuna-dashboard on a study store's tuning studies, on 127.0.0.1: the final seeds'
studies are left out of its list (they have no search space, which breaks the
dashboard's importance panel, and their "best trial" would be the luckiest seed; the
seeds are MLflow's to show), no request log, and Ctrl-C stops it without a traceback."""

from __future__ import annotations

import signal
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna_dashboard

from mnist_study.errors import ConfigError, port_taken
from mnist_study.study.optuna_storage import optuna_storage


class QuietHandler(WSGIRequestHandler):
    """wsgiref's handler without its line per request on the console."""

    def log_message(self, format, *args) -> None:
        pass


def serve(storage_url: str, port: int) -> int:
    store = optuna_storage(storage_url)
    if not store.exists():
        raise ConfigError(f"{storage_url}: no Optuna storage there yet; run a study first")
    storage = store.open()
    every_study = storage.get_all_studies
    # The list the dashboard shows (and only that: a final study's page still opens by id).
    storage.get_all_studies = lambda: [
        s for s in every_study() if not s.study_name.endswith(".final")
    ]
    try:
        server = make_server(
            "127.0.0.1", port, optuna_dashboard.wsgi(storage), handler_class=QuietHandler
        )
    except OSError as exc:
        raise port_taken(port, exc, f"make dashboard DASHBOARD_PORT={port + 1}") from None
    print(f"Optuna dashboard: http://127.0.0.1:{port}  (tuning studies; Ctrl-C to stop)")

    def stop(signum, frame):  # also where SIGINT came ignored (a background job)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("Optuna dashboard stopped")
    finally:
        server.server_close()
    return 0
