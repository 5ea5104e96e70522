"""Bad input from the command line or the environment (a flag, a missing GPU, a server
that does not answer), refused in one line before anything is written."""

from __future__ import annotations

import contextlib
import http.server
import subprocess
import threading
import time

import pytest
from helpers import (
    TINY,
    cli,
    copy_of,
    free_port,
    one_line_error,
    run_args,
    stores,
)


def test_unreachable_tracking_server_fails_fast(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    done = cli(*run_args(tmp_path / "tiny.toml", uri, str(tmp_path / "o.journal")), process=False)
    assert time.time() - started < 30
    one_line_error(done, uri, "does not answer")
    assert not (tmp_path / "o.journal").exists()


@pytest.mark.parametrize("flag", ["--tracking-uri", "--storage"])
def test_a_database_server_that_does_not_answer_fails_fast(tmp_path, flag):
    """Nothing listening at a postgresql:// address: one line within seconds (MLflow
    alone retries for minutes, Optuna prints a traceback), and no other store made."""
    (tmp_path / "tiny.toml").write_text(TINY)
    url = f"postgresql://study@127.0.0.1:{free_port()}/db"
    tracking, storage = stores(tmp_path / "s")
    given = {"--tracking-uri": tracking, "--storage": storage} | {flag: url}
    started = time.time()
    done = cli(
        "run", str(tmp_path / "tiny.toml"), *(x for kv in given.items() for x in kv), process=False
    )
    assert time.time() - started < 30
    one_line_error(done, f"{flag} {url}: the database does not answer")
    assert not (tmp_path / "s").exists()


def test_a_report_whose_storage_database_does_not_answer_is_one_line(finished, tmp_path):
    spec, tracking, _ = copy_of(finished, tmp_path)
    url = f"postgresql://study@127.0.0.1:{free_port()}/db"
    args = ["report", str(spec), "--tracking-uri", tracking, "--storage", url]
    done = cli(*args, "--out", str(tmp_path / "reports"), process=False)
    one_line_error(done, f"--storage {url}: the database does not answer")
    assert not (tmp_path / "reports").exists()


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]):
    """A web server on a free loopback port answering with `handler`: its address."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


class AnotherWebServer(http.server.BaseHTTPRequestHandler):
    """A web server that is not MLflow's: a page for every address."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"<html><body>Welcome</body></html>")

    def log_message(self, *args):
        pass


def test_a_web_server_that_is_not_mlflow_is_one_line(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    with serving(AnotherWebServer) as uri:
        done = cli(
            *run_args(tmp_path / "tiny.toml", uri, str(tmp_path / "o.journal")), process=False
        )
    one_line_error(done, uri, "not as an MLflow server", "<html>")
    assert not (tmp_path / "o.journal").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--tracking-uri", "ftp://host/x"], "unsupported"),
        (["--tracking-uri", "sqlite:///{tmp}/file/mlflow.db"], "cannot write there"),
        (["--storage", "{tmp}/file/optuna.journal"], "cannot write there"),
        (["--storage", "{tmp}"], "is a folder"),
        (["--tracking-uri", "sqlite:///{tmp}/q?x/mlflow.db"], "the path holds ?"),
        (["--tracking-uri", "sqlite:///{tmp}/50%/mlflow.db"], "the path holds %"),
        (["--tracking-uri", "sqlite:///{tmp}/a#b/mlflow.db"], "the path holds #"),
        (["--threads", "-1"], "--threads -1"),
        (["--workers", "0"], "--workers 0"),
        (["--workers", "many"], "--workers many: must be 'auto' or"),
    ],
    ids=[
        "scheme",
        "tracking-folder",
        "storage-folder",
        "storage-is-folder",
        "tracking-query",
        "tracking-escape",
        "tracking-fragment",
        "threads",
        "workers",
        "workers-word",
    ],
)
def test_bad_command_line_is_refused_before_any_write(tmp_path, args, needle):
    (tmp_path / "tiny.toml").write_text(TINY)
    (tmp_path / "file").write_text("a file where a folder should be")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    defaults = ["--tracking-uri", f"sqlite:///{tmp_path}/m/mlflow.db"]
    defaults += ["--storage", str(tmp_path / "o" / "optuna.journal")]
    done = cli("run", str(tmp_path / "tiny.toml"), *defaults, *args, process=False)
    one_line_error(done, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "tiny.toml"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--tunings", "0"], "--tunings 0: must be positive"),
        (["--effect", "-0.3"], "--effect -0.3: must be positive"),
        (["--worker-counts", "2,0"], "--worker-counts 2,0: must be positive"),
        (["--worker-counts", "2;64"], "--worker-counts '2;64': give counts separated by commas"),
    ],
    ids=["tunings", "effect", "workers", "workers-list"],
)
def test_plan_refuses_its_numbers_before_it_reads_a_store(tmp_path, args, needle):
    (tmp_path / "tiny.toml").write_text(TINY)
    tracking = ["--tracking-uri", f"sqlite:///{tmp_path}/missing/mlflow.db"]
    done = cli("plan", str(tmp_path / "tiny.toml"), *tracking, *args, process=False)
    one_line_error(done, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


@pytest.mark.parametrize("given", [["--epocs", "1"], ["--epoch", "1"]], ids=["typo", "abbreviated"])
def test_an_unknown_option_is_refused_by_its_command(given):
    """Said by the command it was given to, with that command's help; a prefix of an
    option is no option (`--epoch` for `--epochs` would silently change if one were added)."""
    done = cli("train", *given, process=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"mnist-study train: error: unrecognized arguments: {given[0]}")
    assert done.stderr.rstrip().endswith("see mnist-study train --help")


def test_cuda_without_a_gpu_is_refused_before_any_write(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "gpu.toml").write_text(TINY.replace("[defaults]", '[defaults]\ndevice = "cuda"'))
    done = cli(*run_args(tmp_path / "gpu.toml", *stores(tmp_path / "s")), process=False)
    one_line_error(done, "device = 'cuda'", "no CUDA GPU")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--rounds", "0"], "--rounds 0: must be at least 1"),
        (["--json", "{tmp}/file/bench.json"], "--json {tmp}/file/bench.json: cannot write there"),
        (["--study-workers", "{tmp}/missing.toml"], "missing.toml"),
    ],
    ids=["steps", "rounds", "json", "study-workers"],
)
def test_bench_refuses_its_arguments_before_it_measures(tmp_path, args, needle):
    (tmp_path / "file").write_text("a file where a folder should be")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    started = time.time()
    done = cli("bench", *args, process=False)
    one_line_error(done, needle.replace("{tmp}", str(tmp_path)))
    assert time.time() - started < 30 and done.stdout == ""


class HealthyButFailing(http.server.BaseHTTPRequestHandler):
    """A tracking server that says it is healthy and fails every request (500)."""

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 500)
        self.end_headers()
        self.wfile.write(b"OK" if self.path == "/health" else b"internal error")

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_tracking_server_answering_500_is_given_up_on_in_seconds(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    started = time.time()
    with serving(HealthyButFailing) as uri:
        done = cli(*run_args(tmp_path / "tiny.toml", uri, str(tmp_path / "o.journal")))
    # Not a speed claim: a bound between ours (seconds alone; 61 s on 2 loaded cores)
    # and MLflow's own retries (over 4 minutes).
    assert time.time() - started < 150
    retrying, error = done.stderr.splitlines(keepends=True)  # a line as it starts to retry
    assert "failed a request (HTTP 500" in retrying and "retrying up to 3 times" in retrying
    one_line_error(subprocess.CompletedProcess(done.args, 2, done.stdout, error), "500")
