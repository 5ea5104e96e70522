"""`mnist-study ui`: MLflow's UI server, behind a thin layer of ours that makes a new
browser land in model training.

MLflow 3.17 picks the UI's workflow (GenAI or model training) from the URL's
`workflowType`, else from the browser's localStorage key `mlflow.workflowType_v1`
(default GenAI), and ignores an experiment's `mlflow.experimentKind`. So its front page,
an experiment clicked from it and every run page open in GenAI mode for a user who did
not follow one of our links. The layer forwards every request to MLflow unchanged and
adds one script to the HTML page, which sets that key to model training where the
browser has none (a user's own choice in the sidebar stays) and keeps MLflow's
Assistant panel from opening over the runs table on a first visit."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from mnist_study.tracking.names import VIEW_TAG
from mnist_study.tracking.store import studies

# The keys and JSON values MLflow's useLocalStorage writes (key + "_v" + version).
FIRST_VISIT = {
    "mlflow.workflowType_v1": '"machine_learning"',
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.assistant.panelOpen_v1": "false",
}
# A user's own saved view of an experiment's runs table, as MLflow 3.17 stores it (read
# from Chromium after "Override saved view"): a study's view seeds it, so that the study
# clicked from the front page opens on its cells, not on MLflow's default columns.
SAVED_VIEW_KEY = 'MLflowLocalStorage-1.1-ExperimentPage-["{}"]-ReactComponentState'
SAVED_VIEW = {
    "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
    "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
    "modelVersionFilter": "All Runs", "selectedColumns": [], "columnOrder": [],
    "columnWidths": {}, "runsExpanded": {}, "runsPinned": [], "runsHidden": [],
    "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False,
    "runListHidden": False, "isAccordionReordered": False, "useGroupedValuesInCharts": True,
    "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {}, "autoRefreshEnabled": True,
    "globalLineChartConfig":
        {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
}  # fmt: skip


def first_visit_script(views: dict[str, str]) -> bytes:
    """The script added to MLflow's page: each key set where the browser has none, so a
    user's own choices (the sidebar's mode, a view saved over ours) stay; `views`: each
    study's experiment id and its saved view (JSON)."""
    keys = dict(FIRST_VISIT)
    for experiment_id, view in views.items():
        keys[SAVED_VIEW_KEY.format(experiment_id)] = json.dumps(SAVED_VIEW | json.loads(view))
    pairs = json.dumps(keys).replace("</", "<\\/")  # no value can end the script early
    return (
        "<script>(() => { const s = window.localStorage; "
        f"for (const [k, v] of Object.entries({pairs})) "
        "if (s.getItem(k) === null) s.setItem(k, v); })();</script>"
    ).encode()


# Hop-by-hop headers (RFC 9110 7.6.1), and those the layer recomputes.
NOT_FORWARDED = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"}


class Layer(http.server.BaseHTTPRequestHandler):
    """Forwards one request to MLflow on `upstream` (a port of 127.0.0.1) and its answer
    back, the script added to an HTML answer."""

    upstream = 0  # MLflow's port
    script = b""
    protocol_version = "HTTP/1.1"

    def forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED}
        headers["Accept-Encoding"] = "identity"  # the HTML must come uncompressed to edit
        # MLflow takes seconds to start after the links print, over 90 s on a loaded machine
        deadline = time.time() + 180
        while True:
            upstream = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=300)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                content = answer.read()
                break
            except ConnectionRefusedError:
                if time.time() > deadline:
                    self.send_error(502, "MLflow's server did not start")
                    return
                time.sleep(0.5)
            except OSError:
                self.send_error(502, "MLflow's server did not answer")
                return
            finally:
                upstream.close()
        if answer.getheader("Content-Type", "").startswith("text/html"):
            content = content.replace(b"<head>", b"<head>" + self.script, 1)
        self.send_response(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in NOT_FORWARDED:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # the browser left before the answer
            super().handle()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = forward

    def log_message(self, format, *args) -> None:  # no request log, as MLflow's is off
        pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(tracking_uri: str, layer: http.server.HTTPServer) -> int:
    """MLflow's server on a free port of 127.0.0.1 and `layer` in front of it, until
    KeyboardInterrupt (0) or MLflow's exit (its code); MLflow runs in a session of its
    own, so that Ctrl-C reaches only us, and is stopped by SIGTERM, then KILL after 2 s."""
    inner = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
         "--port", str(inner), "--workers", "1",
         "--uvicorn-opts", "--no-access-log --log-level warning"],
        start_new_session=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},  # a library's, not the user's
    )  # fmt: skip
    Layer.upstream = inner
    views = {i: tags[VIEW_TAG] for _, i, tags in studies(tracking_uri) if tags.get(VIEW_TAG)}
    Layer.script = first_visit_script(views)
    threading.Thread(target=lambda: (server.wait(), layer.shutdown()), daemon=True).start()
    try:
        layer.serve_forever(poll_interval=0.5)
        return server.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        layer.server_close()
        os.killpg(server.pid, signal.SIGTERM)
        deadline = time.time() + 2
        while server.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def bind(port: int) -> http.server.ThreadingHTTPServer:
    """The layer's server bound to 127.0.0.1:`port` (OSError where it is taken)."""
    http.server.ThreadingHTTPServer.daemon_threads = True
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), Layer)
