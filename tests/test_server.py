"""README's recipe for several machines, tested: a real `mlflow server` on 127.0.0.1
(SQLite backend, artifacts proxied into tmp_path), a study with two workers logging to
it over HTTP, the report built from it, and the link to its runs opened in a browser."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import TINY, assert_budget_met_exactly, cli, free_port, run_two_workers

from mnist_study.analysis.publish import write_report
from mnist_study.study.spec_file import load_spec


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--workers", "1"]
    cmd += ["--artifacts-destination", str(tmp_path / "artifacts")]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    tail = (tmp_path / "server.log").read_text()[-500:]
                    pytest.skip(f"mlflow server did not start here: {tail}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log.close()


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
    models = list((tmp_path / "artifacts").glob("*/*/artifacts/model/MLmodel"))
    assert len(models) == 2 * len(spec.settings.seeds)

    # The link `mnist-study studies` prints (and `make ui` shows) opens the runs table,
    # not MLflow's GenAI overview, in a real browser.
    if CHROMIUM is None:
        pytest.skip("no Chromium here (Debian's chromium package; .ci/run installs it)")
    listed = cli("studies", "--tracking-uri", mlflow_server, "--ui", mlflow_server)
    [link] = [line.split()[1] for line in listed.stdout.splitlines() if line.split()[0] == "tiny"]
    page = rendered(link, tmp_path)
    assert "Run Name" in page and "baseline" in page and "batchnorm" in page
    assert "Detect Issues" not in page
