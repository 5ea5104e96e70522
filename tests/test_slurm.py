"""Workers on Slurm (`run --launcher slurm`), against a real one-node cluster where one
answers (.ci/run starts it with scripts/slurm-one-node.sh): the same study as local
workers give, a cancelled worker's unit redone once, Ctrl-C cancelling the array, a
killed submitting command whose array runs on and is attached to again. The checks of
where the workers could reach the stores need no cluster."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
from helpers import (
    REPO,
    SLOW2,
    TINY,
    assert_budget_met_exactly,
    cli,
    command,
    one_line_error,
    run_args,
    runs,
    stores,
    trial_states,
    wait_for_running_trial,
)
from mlflow.tracking import MlflowClient
from test_determinism import outcome

from mnist_study.errors import ConfigError
from mnist_study.study.optuna_storage import optuna_storage
from mnist_study.study.slurm import (
    ARRAYS_TAG,
    LIVE_STATES,
    cancel,
    job_states,
    reach,
    slurm_tool,
)
from mnist_study.study.spec_file import load_spec
from mnist_study.study.stores import study_names


def slurm_up() -> str:
    """'' where a Slurm node takes jobs here, else why not."""
    if shutil.which("sinfo") is None:
        return "no Slurm here (sinfo not found); .ci/run installs and starts one"
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if done.returncode or not {"idle", "mixed", "allocated"} & set(done.stdout.split()):
        return "Slurm installed but no node takes jobs; run scripts/slurm-one-node.sh"
    return ""


SLURM_DOWN = slurm_up()  # asked once: each ask is a sinfo
needs_slurm = pytest.mark.skipif(bool(SLURM_DOWN), reason=SLURM_DOWN or "Slurm is up")


@pytest.fixture(autouse=True)
def arrays_cancelled_after(tmp_path):
    """Whatever array a test leaves (a failed one's, or one still suspended) is cancelled,
    not left holding the one node's CPUs while the next Slurm test waits behind it."""
    yield
    if SLURM_DOWN:  # no cluster here: nothing was submitted
        return
    queue = slurm_tool("squeue", "-h", "-o", "%A|%o")
    cancel([job for job, _, script in (line.partition("|") for line in queue.splitlines())
            if script.startswith(f"{tmp_path}/")])  # fmt: skip


def test_a_store_the_workers_cannot_reach_is_refused_and_one_for_one_node_is_said(tmp_path):
    here = __import__("socket").gethostname()
    with pytest.raises(ConfigError, match="relative path.*give it absolute"):
        reach("--storage", "mlruns/optuna.journal", [here])
    with pytest.raises(ConfigError, match=r"sqlite:///mlruns/mlflow.db: a relative path"):
        reach("--tracking-uri", "sqlite:///mlruns/mlflow.db", [here])
    # /dev/shm or /tmp: this node's own; fine for a one-node cluster, not with others.
    local = str(tmp_path / "optuna.journal")
    assert "serves a one-node cluster only" in reach("--storage", local, [here])
    with pytest.raises(ConfigError, match="node-2 cannot read; put it on a shared filesystem"):
        reach("--storage", local, [here, "node-2"])
    with pytest.raises(ConfigError, match="loopback, which the workers on node-2 cannot reach"):
        reach("--tracking-uri", "http://127.0.0.1:5000", ["node-2"])
    assert reach("--tracking-uri", "http://mlflow.cluster:5000", ["node-2"]) is None
    assert reach("--storage", "postgresql://me@db.cluster/optuna", ["node-2"]) is None


def test_slurm_options_are_refused_in_one_line_before_anything_is_written(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    tracking, storage = stores(tmp_path)
    base = run_args(spec, tracking, storage)
    one_line_error(cli(*base, "--detach", process=False), "--detach: only with --launcher slurm")
    slurm = [*base, "--launcher", "slurm"]
    one_line_error(cli(*slurm, "--workers", "auto", process=False), "--workers auto")
    one_line_error(cli(*slurm, "--cpus-per-worker", "0", process=False), "--cpus-per-worker 0")
    one_line_error(cli(*slurm, "--time-limit", "0", process=False), "--time-limit 0")
    # No Slurm on PATH: said in one line, not a traceback.
    done = cli(*slurm, env={"PATH": str(Path(command()[0]).parent)})
    one_line_error(done, "--launcher slurm: sinfo not found")
    relative = cli("run", str(spec), "--launcher", "slurm", "--workers", "2", cwd=tmp_path)
    if not SLURM_DOWN:
        one_line_error(relative, "a relative path", "give it absolute")
    assert not list(tmp_path.rglob("*.db")) and not list(tmp_path.rglob("*.journal"))


def assert_every_unit_done_once(tracking: str, storage: str, spec) -> int:
    """Each tuning slot and final seed finished exactly once in Optuna, with one FINISHED
    MLflow run each; returns how many trials ended FAIL (interrupted and redone)."""
    opened = optuna_storage(storage).open()
    failed = 0
    for tuning in spec.tunings:
        tune, final = study_names(spec, tuning)
        for name, key, wanted in ((tune, "slot", list(range(spec.settings.trials))),
                                  (final, "seed", sorted(spec.settings.seeds))):  # fmt: skip
            trials = optuna.load_study(study_name=name, storage=opened).trials
            done = [t.user_attrs[key] for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
            assert sorted(done) == wanted, (name, done)
            failed += sum(t.state.name == "FAIL" for t in trials)
    _, found = runs(tracking, spec.name)
    finished = [r.data.tags["role"] for r in found if r.info.status == "FINISHED"]
    assert finished.count("tune") == len(spec.tunings) * spec.settings.trials
    assert finished.count("final") == len(spec.tunings) * len(spec.settings.seeds)
    return failed


def submitted_array(tracking: str, study: str) -> list[str]:
    client = MlflowClient(tracking)
    return client.get_experiment_by_name(study).tags[ARRAYS_TAG].split(",")


def wait_for_array_end(arrays: list[str], timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = job_states(arrays)
        if not any(state in LIVE_STATES for state, _ in states.values()):
            return states
        time.sleep(0.5)
    raise AssertionError(f"Slurm jobs of {arrays} still live after {timeout} s")


def slurm_run(spec: Path, tracking: str, storage: str, tmp_path: Path, *more: str) -> list[str]:
    return [*run_args(spec, tracking, storage), "--launcher", "slurm", "--workers", "2",
            "--slurm-folder", str(tmp_path / "slurm"), *more]  # fmt: skip


@pytest.mark.slow
@needs_slurm
def test_two_slurm_workers_give_the_study_one_local_worker_gives(tmp_path):
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(TINY)
    spec = load_spec(spec_path)
    (tmp_path / "local").mkdir()
    local = stores(tmp_path / "local")
    assert cli(*run_args(spec_path, *local, "--workers", "1")).returncode == 0
    on_slurm = stores(tmp_path)
    done = cli(*slurm_run(spec_path, *on_slurm, tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "serves a one-node cluster only" in done.stdout
    assert outcome(spec, on_slurm[1]) == outcome(spec, local[1])
    assert_budget_met_exactly(*on_slurm, spec)
    (array,) = submitted_array(on_slurm[0], spec.name)
    # Slurm's own record: both tasks of the array ran and completed.
    states = job_states([array])
    assert {states[f"{array}_{i}"][0] for i in range(2)} == {"COMPLETED"}
    assert f"slurm job {array}_1: COMPLETED" in done.stdout
    assert "test acc" in done.stdout and "complete in MLflow" in done.stdout.splitlines()[-1]


@pytest.mark.slow
@needs_slurm
def test_a_cancelled_worker_job_leaves_its_unit_to_the_other_and_nothing_runs_twice(tmp_path):
    spec_path = tmp_path / "slow.toml"
    spec_path.write_text(SLOW2)
    spec = load_spec(spec_path)
    tracking, storage = stores(tmp_path)
    args = slurm_run(spec_path, tracking, storage, tmp_path)
    proc = subprocess.Popen(command(*args), stdout=subprocess.PIPE, text=True, cwd=REPO)
    wait_for_running_trial(storage, "*", 0)
    (array,) = submitted_array(tracking, spec.name)
    subprocess.run(["scancel", f"{array}_0"], check=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"slurm job {array}_0: CANCELLED" in out
    again = cli(*args)
    assert again.returncode == 0 and "nothing to run" in again.stdout
    assert assert_every_unit_done_once(tracking, storage, spec) == 1  # the cancelled unit


@pytest.mark.slow
@needs_slurm
def test_ctrl_c_cancels_the_array_and_the_same_command_resumes(tmp_path):
    spec_path = tmp_path / "slow.toml"
    spec_path.write_text(SLOW2)
    spec = load_spec(spec_path)
    tracking, storage = stores(tmp_path)
    args = slurm_run(spec_path, tracking, storage, tmp_path)
    proc = subprocess.Popen(command(*args), stdout=subprocess.PIPE, text=True, cwd=REPO)
    wait_for_running_trial(storage, "*", None)
    (array,) = submitted_array(tracking, spec.name)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 130, out[-3000:]
    assert f"cancelling Slurm array(s) {array}" in out
    states = wait_for_array_end([array], timeout=5)  # ended before the command did
    assert {state for state, _ in states.values()} <= {"CANCELLED", "COMPLETED"}
    failed = sum(c["FAIL"] for c in trial_states(storage, spec).values())
    assert failed >= 1  # the units in progress, recorded FAIL by their workers
    again = cli(*args)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "resuming study" in again.stdout, again.stdout
    assert assert_every_unit_done_once(tracking, storage, spec) == failed
    assert len(submitted_array(tracking, spec.name)) == 2


@pytest.mark.slow
@needs_slurm
def test_a_killed_submitting_command_leaves_the_array_and_the_same_command_attaches(tmp_path):
    spec_path = tmp_path / "slow.toml"
    spec_path.write_text(SLOW2.replace("trials = 2", "trials = 4"))
    spec = load_spec(spec_path)
    tracking, storage = stores(tmp_path)
    args = slurm_run(spec_path, tracking, storage, tmp_path)
    proc = subprocess.Popen(command(*args), stdout=subprocess.DEVNULL, cwd=REPO)
    wait_for_running_trial(storage, "*", None)
    proc.kill()
    proc.wait()
    (array,) = submitted_array(tracking, spec.name)
    # Held (SIGSTOP by Slurm) while it is looked at, so that it cannot finish first.
    subprocess.run(["scontrol", "suspend", array], capture_output=True)
    assert any(s in LIVE_STATES for s, _ in job_states([array]).values())
    status = cli("status", str(spec_path), "--tracking-uri", tracking, "--storage", storage)
    assert status.returncode == 0 and f"Slurm array(s) {array}: " in status.stdout
    running = int(re.search(r"units done, (\d+) running", status.stdout)[1])
    assert running >= 1 and status.stdout.count("  running: ") == running
    again = subprocess.Popen(command(*args), stdout=subprocess.PIPE, text=True, cwd=REPO)
    said = []
    silent = threading.Timer(300, again.kill)  # stuck before saying either: fails below
    silent.start()
    while not said or not said[-1].startswith(("attaching", "submitted")):
        said.append(again.stdout.readline())
        assert said[-1], "".join(said)  # it ended (or was killed) before saying either
    silent.cancel()
    subprocess.run(["scontrol", "resume", array], capture_output=True)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert said[-1].startswith(f"attaching to Slurm array(s) {array}"), said[-1]
    assert submitted_array(tracking, spec.name) == [array]  # nothing submitted twice
    assert assert_every_unit_done_once(tracking, storage, spec) == 0


@pytest.mark.slow
@needs_slurm
def test_detach_submits_and_returns_and_status_then_the_same_command_finish_it(tmp_path):
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(TINY)
    tracking, storage = stores(tmp_path)
    args = slurm_run(spec_path, tracking, storage, tmp_path)
    done = cli(*args, "--detach")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "submitted Slurm array" in done.stdout and "detached: follow with" in done.stdout
    (array,) = submitted_array(tracking, "tiny")
    status = cli("status", str(spec_path), "--tracking-uri", tracking, "--storage", storage)
    assert status.returncode == 0 and f"Slurm array(s) {array}: " in status.stdout
    wait_for_array_end([array], timeout=300)
    again = cli(*args)
    assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout
    assert assert_every_unit_done_once(tracking, storage, load_spec(spec_path)) == 0
