"""Two workers on a real PostgreSQL server (loopback), as on several machines.

Skipped, with the reason, where no PostgreSQL server can be started here.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

import pytest
from helpers import TINY, assert_budget_met_exactly, free_port, run_two_workers

from mnist_study.study.spec_file import load_spec


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg missing (pip install -e '.[postgres]')")
    found = shutil.which("initdb") or next(
        iter(glob.glob("/usr/lib/postgresql/*/bin/initdb")), None
    )
    if found is None:
        pytest.skip("PostgreSQL server not installed (Debian: apt-get install postgresql)")
    bindir = os.path.dirname(os.path.realpath(found))
    # initdb refuses to run as root: run the server as the 'postgres' user when root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = tempfile.mkdtemp(prefix="pg-", dir="/tmp")
    os.chmod(base, 0o777)
    data, port = os.path.join(base, "data"), free_port()

    def run(*cmd):
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True)

    init = run(f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "study", "--no-sync")
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    start = run(
        f"{bindir}/pg_ctl",
        "-D",
        data,
        "-w",
        "-l",
        os.path.join(base, "log"),
        "-o",
        f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off",
        "start",
    )
    if start.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]}")
    for db in ("optuna", "mlflow"):
        run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "study", db)
    yield f"postgresql://study@127.0.0.1:{port}"
    run(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop")
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql(postgres_url, tmp_path):
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(TINY)
    tracking, storage = f"{postgres_url}/mlflow", f"{postgres_url}/optuna"
    run_two_workers(tiny, tracking, storage, cwd=tmp_path)
    assert_budget_met_exactly(tracking, storage, load_spec(tiny))
