"""README's recipe for several machines, tested: a real `mlflow server` on 127.0.0.1
(SQLite backend, artifacts proxied into tmp_path), a study with two workers logging to
it over HTTP, the report built from it, and the link to its runs opened in a browser."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import (
    REPO,
    SLOW2,
    TINY,
    answers,
    assert_budget_met_exactly,
    cli,
    command,
    copy_of,
    free_port,
    one_line_error,
    run_args,
    run_two_workers,
    trial_states,
    wait_for_running_trial,
)

from mnist_study.analysis.publish import write_report
from mnist_study.study.spec_file import load_spec


def start_server(tmp_path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port (SQLite backend in tmp_path, artifacts proxied
    into it), answering /health; skips the test where it cannot start."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--workers", "1"]
    cmd += ["--artifacts-destination", str(tmp_path / "artifacts")]
    with open(tmp_path / "server.log", "a") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                stop(server)
                tail = (tmp_path / "server.log").read_text()[-500:]
                pytest.skip(f"mlflow server did not start here: {tail}")
            time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = start_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered(url: str, tmp_path) -> str:
    """The page's text after its scripts ran, in headless Chromium from a clean profile."""
    done = subprocess.run(
        [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1500,1000", "--virtual-time-budget=30000", "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", done.stdout))


@pytest.mark.slow
def test_two_workers_log_a_study_to_an_mlflow_server_and_it_reports(tmp_path, mlflow_server):
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(TINY)
    storage = str(tmp_path / "optuna.journal")
    run_two_workers(spec_path, mlflow_server, storage)
    spec = load_spec(spec_path)
    assert_budget_met_exactly(mlflow_server, storage, spec)
    body = write_report(mlflow_server, "tiny", tmp_path / "reports", storage=storage)
    assert "| baseline |" in body and "**Checks**: none raised." in body
    # The final runs' models went through the server into its artifact root.
    models = list((tmp_path / "artifacts").glob("*/models/*/artifacts/MLmodel"))
    assert len(models) == 2 * len(spec.settings.seeds)

    # The link `mnist-study studies` prints (and `make ui` shows) opens the runs table,
    # not MLflow's GenAI overview, in a real browser.
    if CHROMIUM is None:
        pytest.skip("no Chromium here (Debian's chromium package; .ci/run installs it)")
    listed = cli("studies", "--tracking-uri", mlflow_server, "--ui", mlflow_server)
    [link] = [line.split()[1] for line in listed.stdout.splitlines() if line.split()[0] == "tiny"]
    assert "viewStateShareKey=cells" in link
    page = rendered(link, tmp_path)
    assert "Run Name" in page and "baseline" in page and "batchnorm" in page
    assert "Detect Issues" not in page
    # The study's saved view: its cells' numbers are columns, without touching Columns.
    for column in ("test_acc_mean", "test_acc_mean_lo95", "best_val_acc", "best_lr"):
        assert column in page, column


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_study_stops_it_in_a_line_and_it_resumes(tmp_path):
    """The server killed while two workers train: the command ends within a minute or
    two (MLflow's retries bounded) with two lines per worker at most, no traceback; the
    server back, the same command completes the budget."""
    port = free_port()
    url, server = f"http://127.0.0.1:{port}", start_server(tmp_path, port)
    path, storage = tmp_path / "slow.toml", str(tmp_path / "optuna.journal")
    path.write_text(SLOW2)
    proc = subprocess.Popen(
        command(*run_args(path, url, storage, "--workers", "2")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        wait_for_running_trial(storage, "slow.*[!l]", None)
        stop(server)
        started = time.time()
        _, err = proc.communicate(timeout=240)
    finally:
        stop(server)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert time.time() - started < 120
    lines = err.strip().splitlines()  # per worker: its first retry said, then its error
    errors = [x for x in lines if x.startswith("mnist-study: error: ")]
    retries = [x for x in lines if x.startswith("mnist-study: the MLflow server failed")]
    assert 1 <= len(errors) <= 2 and len(retries) <= 2 and len(lines) == len(errors + retries)
    server = start_server(tmp_path, port)
    try:
        done = cli(*run_args(path, url, storage, "--workers", "2"))
    finally:
        stop(server)
    assert done.returncode == 0, done.stderr[-2000:]
    states = trial_states(storage, load_spec(path))
    for variant in ("baseline", "batchnorm"):
        tuned = states[f"slow.{variant}"]
        assert (
            tuned["COMPLETE"] + tuned["PRUNED"] == 2
            and states[f"slow.{variant}.final"]["COMPLETE"] == 1
        )


@contextlib.contextmanager
def taken_port():
    """A port of 127.0.0.1 that another socket listens on, while the block runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_ui_on_a_taken_port_is_one_line(finished, tmp_path):
    _, tracking, _ = copy_of(finished, tmp_path)
    with taken_port() as port:
        done = cli("ui", "--tracking-uri", tracking, "--port", str(port), process=False)
    one_line_error(done, f"--port {port}: address already in use", "UI_PORT=")
    assert done.stdout == ""  # no links to a server that will not start


@pytest.mark.slow
def test_ui_shows_the_links_serves_quietly_and_stops_on_ctrl_c(finished, tmp_path):
    _, tracking, _ = copy_of(finished, tmp_path)
    port = free_port()
    ui = subprocess.Popen(
        command("ui", "--tracking-uri", tracking, "--port", str(port)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for page in ("/health", "/", "/ajax-api/2.0/mlflow/experiments/search?max_results=5"):
            answers(ui, f"http://127.0.0.1:{port}{page}")
        ui.send_signal(signal.SIGINT)
        # A server that ignored Ctrl-C would time out here; how fast it stops depends on
        # the machine's load (11 s once beside a study and the whole test suite).
        out, err = ui.communicate(timeout=30)
    finally:
        if ui.poll() is None:
            ui.kill()
    assert ui.returncode == 0
    assert "Traceback" not in err and "GET /" not in out + err, err  # no request log
    assert f"http://127.0.0.1:{port}/#/experiments/" in out and "viewStateShareKey=cells" in out
    assert out.rstrip().endswith("MLflow UI stopped")


def test_dashboard_on_a_taken_port_or_a_missing_store_is_one_line(finished, tmp_path):
    _, _, storage = copy_of(finished, tmp_path)
    with taken_port() as port:
        done = cli("dashboard", "--storage", storage, "--port", str(port), process=False)
    one_line_error(done, f"--port {port}: address already in use", "DASHBOARD_PORT=")
    assert done.stdout == ""
    missing = str(tmp_path / "none.journal")
    done = cli("dashboard", "--storage", missing, process=False)
    one_line_error(done, f"{missing}: no Optuna storage there yet; run a study first")


@pytest.mark.slow
def test_dashboard_lists_the_tuning_studies_each_opens_and_it_stops_on_ctrl_c(
    smoke_study, tmp_path
):
    """optuna-dashboard on a smoke run (every variant, pruned trials): the final seeds'
    studies are not listed, every listed study's pages and panels answer without a
    traceback in the console, requests are not logged, and Ctrl-C stops it."""
    spec, _, storage = smoke_study
    port = free_port()
    server = subprocess.Popen(
        command("dashboard", "--storage", storage, "--port", str(port)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        listing = answers(server, f"{base}/api/studies")
        listed = {s["study_name"]: s["study_id"] for s in json.loads(listing)["study_summaries"]}
        assert sorted(listed) == sorted(f"smoke.{v.name}" for v in spec.variants)
        for study_id in listed.values():
            for page in (f"/api/studies/{study_id}", f"/api/studies/{study_id}/param_importances"):
                urllib.request.urlopen(base + page, timeout=30).read()  # raises on a 500
        if CHROMIUM is not None:  # the study's page as a person sees it
            first = min(listed.values())
            page = rendered(f"{base}/dashboard/studies/{first}", tmp_path)
            assert "smoke.baseline" in page and "Hyperparameter Importance" in page, page[:2000]
        asked = time.time()
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0 and time.time() - asked < 5
    assert "Traceback" not in err and "Exception" not in err, err[-3000:]
    assert "GET /" not in out + err  # no request log
    assert out.rstrip().endswith("Optuna dashboard stopped")
