"""Faults a study must survive or refuse: a lost or torn store, dead workers, two commands
at once, signals, unreachable servers. Real stores in tmp dirs, tiny real-MNIST specs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import optuna
import pytest
from helpers import (
    REPO,
    TINY,
    assert_budget_met_exactly,
    cli,
    copy_stores,
    free_port,
    run_main,
    runs,
    stores,
    trial_states,
)
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileSymlinkLock

from mnist_study.analysis.collect import collect
from mnist_study.analysis.publish import write_report
from mnist_study.analysis.report import summarize
from mnist_study.errors import ConfigError
from mnist_study.study.optuna_storage import SignalSafeJournal, optuna_storage, process_is_gone
from mnist_study.study.processes import GPU_WORKERS, auto_workers, cap_workers, worker_cap
from mnist_study.study.runner import run_study
from mnist_study.study.signals import Interrupted, stopping_on_signals
from mnist_study.study.spec import load_spec
from mnist_study.study.stores import study_names
from mnist_study.study.worker import RunOptions

# One variant, trials long enough (seconds) to be killed mid-way.
SLOW = """
[study]
trials = 3
seeds = [0]
startup_trials = 1
[defaults]
epochs = 3
train_size = 2000
val_size = 200
train_eval_size = 200
test_size = 500
[variants.baseline]
search.lr = { low = 1e-3, high = 3e-3, log = true }
"""


SLOW2 = (
    SLOW
    + """
[variants.batchnorm]
set = { batchnorm = true }
search.lr = { low = 1e-3, high = 3e-3, log = true }
"""
)


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("mnist-study: error: ") and done.stderr.count("\n") == 1
    for needle in needles:
        assert needle in done.stderr, done.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_root) -> Path:
    """A finished tiny study: spec and both stores in one folder (copy it to change it)."""
    root = tmp_path_factory.mktemp("finished")
    (root / "tiny.toml").write_text(TINY)
    done = cli(*run_args(root / "tiny.toml", *stores(root)))  # its own process, now gone
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def copy_of(finished: Path, tmp_path: Path) -> tuple[Path, str, str]:
    root = copy_stores(finished, tmp_path / "copy")
    tracking, storage = stores(root)
    return root / "tiny.toml", tracking, storage


def run_args(spec: Path, tracking: str, storage: str, *more: str) -> list[str]:
    return ["run", str(spec), "--tracking-uri", tracking, "--storage", storage, "--quiet", *more]


def test_lost_optuna_storage_is_refused_not_rerun(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    before = len(runs(tracking, "tiny")[1])
    os.remove(storage)
    done = run_main(*run_args(spec, tracking, storage))
    one_line_error(done, "Optuna storage", storage, "none of its trials", "restore", "new name")
    assert len(runs(tracking, "tiny")[1]) == before
    assert not Path(storage).exists()  # the refusal creates no empty storage


def test_lost_mlflow_store_is_refused(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    database = Path(tracking.removeprefix("sqlite:///"))
    database.unlink()
    for _ in range(2):  # the second attempt must not find a half-made store
        done = run_main(*run_args(spec, tracking, storage))
        one_line_error(done, "MLflow runs are not in", "restore the MLflow store")
        assert not database.exists()


def test_replaced_optuna_storage_is_refused(finished, tmp_path, mnist_root):
    """Another run's journal in place of this one's: the finished runs match no trial."""
    spec, tracking, storage = copy_of(finished, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "tiny.toml").write_text(TINY.replace("trials = 2", "trials = 1", 1))
    other_tracking, other_storage = stores(other)
    run_study(
        load_spec(other / "tiny.toml"),
        RunOptions(other_tracking, other_storage, str(mnist_root), log_models=False),
    )
    shutil.copy(other_storage, storage)
    done = run_main(*run_args(spec, tracking, storage))
    one_line_error(done, "not in")


def test_torn_journal_is_repaired_with_a_backup_and_resumes(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    journal = Path(storage)
    # Undo the last finished unit the way a crash mid-write leaves it: half a record.
    lines = journal.read_bytes().splitlines(keepends=True)
    last_tell = max(i for i, line in enumerate(lines) if b'"state":1' in line)
    journal.write_bytes(b"".join(lines[:last_tell]) + lines[last_tell][:25])
    done = run_main(*run_args(spec, tracking, storage))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "last record was cut short" in done.stdout
    backups = list(journal.parent.glob("optuna.journal.torn-*"))
    assert len(backups) == 1 and backups[0].read_bytes().endswith(lines[last_tell][:25])
    # The study is whole again and readable by any Optuna client.
    assert journal.read_bytes().endswith(b"\n")
    states = trial_states(storage, load_spec(spec))
    assert all(s["COMPLETE"] + s["PRUNED"] == 2 for s in states.values())
    assert sum(s["FAIL"] for s in states.values()) == 1  # the unit whose end was torn off


def test_journal_corrupt_before_its_end_is_refused(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    journal = Path(storage)
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3][:10] + lines[4]  # a torn record glued to the next one
    journal.write_bytes(b"".join(lines))
    one_line_error(run_main(*run_args(spec, tracking, storage)), "record 4 is corrupt", storage)


def wait_for_running_trial(storage: str, study: str, worker: int | None, timeout: float = 120):
    """A RUNNING trial of `worker` (any if None) with its MLflow run started and no epoch
    reported yet (so that a signal sent now lands before it ends), in the Optuna study
    `study` or, with a trailing '*', in any study whose name starts so."""
    deadline = time.time() + timeout
    opened = None
    while time.time() < deadline:
        time.sleep(0.3)
        try:  # read only, as any Optuna client would; one reader reads only what is new
            opened = opened or optuna_storage(storage).connect()
            names = [n for n in optuna.get_all_study_names(opened) if fnmatch(n, study)]
            trials = [
                t for n in names for t in optuna.load_study(study_name=n, storage=opened).trials
            ]
        except (KeyError, ValueError):
            continue
        for t in trials:
            mine = worker is None or t.system_attrs.get("worker") == worker
            started = "mlflow_run_id" in t.system_attrs and not t.intermediate_values
            if t.state.name == "RUNNING" and started and mine:
                return t
    raise AssertionError(f"no trial of worker {worker} reached mid-training in time")


def start_slow_study(tmp_path, *args: str, text: str = SLOW, **popen):
    """The SLOW study (or `text`) started in the background on fresh stores in tmp_path:
    (process, spec path, tracking URI, Optuna storage)."""
    path = tmp_path / "slow.toml"
    path.write_text(text)
    tracking, storage = stores(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_study", "--data-root", str(REPO / "data")]
        + run_args(path, tracking, storage, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        **popen,
    )
    return proc, path, tracking, storage


@pytest.mark.slow
@pytest.mark.parametrize(
    "index, sig, how", [(0, signal.SIGKILL, "killed"), (1, signal.SIGTERM, "stopped")]
)
def test_a_killed_worker_is_reaped_and_the_others_finish(tmp_path, index, sig, how):
    """A signal to one worker alone is that worker's death: named, its trial FAIL and its
    run KILLED, redone by the other, and the command exits 0 (the study is complete).
    Two variants, so that each worker tunes one (a tuning's trials run in turn)."""
    proc, path, tracking, storage = start_slow_study(tmp_path, "--workers", "2", text=SLOW2)
    victim = wait_for_running_trial(storage, "slow.*[!l]", index)  # tuning, not .final
    os.kill(victim.system_attrs["pid"], sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    name = signal.Signals(sig).name
    assert f"worker {index} was {how} by {name}; its unit was marked FAIL and redone" in out
    spec = load_spec(path)
    states = trial_states(storage, spec)
    assert sum(s["FAIL"] for s in states.values()) == 1
    name = next(n for n, s in states.items() if s["FAIL"])
    study = optuna.load_study(study_name=name, storage=optuna_storage(storage).open())
    dead = next(t for t in study.trials if t.state.name == "FAIL")
    reason = "worker died" if sig == signal.SIGKILL else "interrupted"
    assert dead.number == victim.number and reason in dead.user_attrs["fail_reason"]
    client, found = runs(tracking, "slow")
    run = client.get_run(dead.system_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna_state"] == "FAIL"
    # The other worker spent the whole budget.
    for variant in ("baseline", "batchnorm"):
        done = states[f"slow.{variant}"]["COMPLETE"] + states[f"slow.{variant}"]["PRUNED"]
        assert done == spec.settings.trials
        assert states[f"slow.{variant}.final"] == {"COMPLETE": 1}


def test_sigterm_stops_like_ctrl_c_and_says_how_to_resume(tmp_path):
    proc, _, tracking, storage = start_slow_study(tmp_path)
    victim = wait_for_running_trial(storage, "slow.baseline", None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "run the same command again to resume" in err and "Traceback" not in err
    study = optuna.load_study(study_name="slow.baseline", storage=optuna_storage(storage).open())
    trial = study.trials[victim.number]
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == "interrupted"
    client, _ = runs(tracking, "slow")
    assert client.get_run(trial.system_attrs["mlflow_run_id"]).info.status == "KILLED"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_parent_alone_stops_every_worker(tmp_path, sig):
    """`kill -INT PID` (a supervisor, `timeout -s INT`) reaches the parent only: it passes
    it on, every trial in progress is FAIL with its run KILLED, exit 128 + N."""
    proc, path, tracking, storage = start_slow_study(tmp_path, "--workers", "2", text=SLOW2)
    wait_for_running_trial(storage, "slow.*[!l]", None)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"interrupted ({name})" in err and "Traceback" not in err
    spec = load_spec(path)
    states = trial_states(storage, spec)
    assert sum(s["RUNNING"] for s in states.values()) == 0
    assert sum(s["FAIL"] for s in states.values()) >= 1
    budget = len(spec.tunings) * (spec.settings.trials + len(spec.settings.seeds))
    assert sum(s["COMPLETE"] + s["PRUNED"] for s in states.values()) < budget  # stopped early
    _, found = runs(tracking, "slow")
    assert not [r for r in found if r.info.status == "RUNNING" and r.data.tags["role"] != "variant"]
    opened = optuna_storage(storage).open()
    failed = [
        t
        for name in states
        for t in optuna.load_study(study_name=name, storage=opened).trials
        if t.state.name == "FAIL"
    ]  # a trial stopped before its run was created has none
    linked = {t.system_attrs["mlflow_run_id"] for t in failed if "mlflow_run_id" in t.system_attrs}
    assert {r.info.run_id for r in found if r.info.status == "KILLED"} == linked


@pytest.mark.slow
def test_ctrl_c_to_a_background_command_with_workers_says_interrupted(tmp_path):
    """Started with `&` from a script, the command ignores SIGINT and only its workers
    see Ctrl-C sent to the group: it must still say interrupted, not that none died."""
    proc, _, _, storage = start_slow_study(
        tmp_path,
        "--workers",
        "2",
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    wait_for_running_trial(storage, "slow.baseline", None)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted (SIGINT)" in err and "died" not in err and "Traceback" not in err


@pytest.mark.slow
def test_two_commands_on_fresh_stores_share_the_budget_with_the_specs_proposals(tmp_path):
    """Two commands at once: the budget is spent exactly, and every trial's point is the
    one its slot's seed and the trials before it give (what one command would propose)."""
    from mnist_study.study.scheduler import propose

    path = tmp_path / "pair.toml"
    path.write_text(TINY.replace("trials = 2", "trials = 4", 1))
    tracking, storage = stores(tmp_path)
    command = [sys.executable, "-m", "mnist_study", "--data-root", str(REPO / "data")]
    procs = [
        subprocess.Popen(
            command + run_args(path, tracking, storage),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    spec = load_spec(path)
    assert_budget_met_exactly(tracking, storage, spec)
    opened = optuna_storage(storage).open()
    for tuning in spec.tunings:
        trials = optuna.load_study(study_name=f"pair.{tuning.cell.name}", storage=opened).trials
        assert [t.user_attrs["slot"] for t in trials] == [0, 1, 2, 3]
        for k, trial in enumerate(trials):
            assert trial.params == propose(tuning, trials[:k], spec.settings.startup_trials)
        assert len({t.params["lr"] for t in trials}) == 4  # never the same point twice
        assert {t.system_attrs["sampler_seed"] for t in trials} == {spec.settings.sampler_seed}


def test_report_counts_one_run_per_seed_and_names_what_it_left_out(finished, tmp_path):
    _, tracking, storage = copy_of(finished, tmp_path)
    client, found = runs(tracking, "tiny")
    final = next(r for r in found if r.data.tags["role"] == "final")
    tags = {k: v for k, v in final.data.tags.items() if k != "mlflow.runName"}
    for copied in (tags, {**tags, "seed": "7"}):  # a duplicate, an extra seed
        copy = client.create_run(final.info.experiment_id, run_name="copy", tags=copied)
        client.log_metric(copy.info.run_id, "accuracy/test", 0.5)
        client.set_terminated(copy.info.run_id)
    alone = summarize(collect(tracking, "tiny"))
    assert list(alone.n) == [2, 2]
    body = write_report(tracking, "tiny", tmp_path / "reports")
    assert "duplicate final run(s) of seeds [" in body and "seeds [7] not in the spec" in body
    crossed = write_report(tracking, "tiny", tmp_path / "reports", storage=storage)
    assert "2 MLflow run(s) match no Optuna trial" in crossed
    assert list(summarize(collect(tracking, "tiny", storage)).n) == [2, 2]


def test_unreachable_tracking_server_fails_fast(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    done = run_main(*run_args(tmp_path / "tiny.toml", uri, str(tmp_path / "o.journal")))
    assert time.time() - started < 30
    one_line_error(done, uri, "does not answer")
    assert not (tmp_path / "o.journal").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--tracking-uri", "ftp://host/x"], "unsupported"),
        (["--tracking-uri", "sqlite:///{tmp}/file/mlflow.db"], "cannot write there"),
        (["--storage", "{tmp}/file/optuna.journal"], "cannot write there"),
        (["--storage", "{tmp}"], "is a folder"),
        (["--threads", "-1"], "--threads -1"),
        (["--workers", "0"], "--workers 0"),
        (["--workers", "many"], "--workers many: must be 'auto' or"),
    ],
    ids=[
        "scheme",
        "tracking-folder",
        "storage-folder",
        "storage-is-folder",
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
    done = run_main("run", str(tmp_path / "tiny.toml"), *defaults, *args)
    one_line_error(done, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "tiny.toml"]


def test_cuda_without_a_gpu_is_refused_before_any_write(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "gpu.toml").write_text(TINY.replace("[defaults]", '[defaults]\ndevice = "cuda"'))
    done = run_main(*run_args(tmp_path / "gpu.toml", *stores(tmp_path / "s")))
    one_line_error(done, "device = 'cuda'", "no CUDA GPU")
    assert not (tmp_path / "s").exists()


def test_report_never_creates_a_store(tmp_path):
    done = run_main("report", "tiny", "--tracking-uri", f"sqlite:///{tmp_path}/typo/mlflow.db")
    one_line_error(done, "no MLflow store at")
    assert list(tmp_path.iterdir()) == []


def test_a_zombie_worker_counts_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.05)
    assert process_is_gone(child.pid)  # exited, not yet collected by its parent
    child.wait()
    assert process_is_gone(child.pid) and not process_is_gone(os.getpid())


def test_workers_auto_is_within_the_machine():
    cap, _ = worker_cap()
    on_cpu, why = auto_workers(cuda=False)
    assert on_cpu == cap and "per core" in why
    on_gpu, _ = auto_workers(cuda=True)
    assert 1 <= on_gpu <= min(cap, GPU_WORKERS)


def test_workers_are_capped_to_what_the_machine_holds(capsys):
    cap, why = worker_cap()
    assert 1 <= cap <= (os.cpu_count() or 1)
    assert cap_workers(10_000) == cap
    line = capsys.readouterr().out
    assert line.startswith(f"--workers 10000: this machine holds {cap} ({why})")
    assert cap_workers(1) == 1


def test_threads_are_capped_to_the_cores_and_default_to_one(capsys):
    """`--threads 1000` on 2 cores ran 14x slower: capped, with a line, like --workers."""
    from mnist_study.study.processes import cap_threads

    cores = len(os.sched_getaffinity(0))
    assert cap_threads(1000) == cores
    assert (
        capsys.readouterr().out
        == f"--threads 1000: this machine has {cores} cores; using {cores}\n"
    )
    assert cap_threads(1) == 1 and cap_threads(0) == 0  # 0: the spec's, else 1 per run


def dead_pid() -> int:
    """The pid of a process that has exited and been collected."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_a_worker_killed_between_claiming_and_recording_its_run(tmp_path, mnist_root):
    """The two boundaries a kill can hit between Optuna's record and MLflow's mirror: a
    worker dead after claiming a trial but before creating its run, and one dead after
    creating the run but before recording its id on the trial. On resume both trials are
    FAIL and redone; the run found by its tags is linked and KILLED, none stays RUNNING;
    the report names the trial with no run."""
    from mnist_study.study.stores import StudyStores
    from mnist_study.study.worker import Worker

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    spec = load_spec(path)
    tracking, storage = stores(tmp_path)
    opts = RunOptions(tracking, storage, str(mnist_root), quiet=True, log_models=False)
    worker = Worker(spec, opts, StudyStores(spec, tracking, storage).create(), 0)
    (no_run, _), (with_run, _) = worker.next_unit(), worker.next_unit()
    orphan = worker.create_run(with_run)[3]  # created; its id never reaches the trial
    for unit in (no_run, with_run):
        unit.study._storage.set_trial_system_attr(unit.trial._trial_id, "pid", dead_pid())

    run_study(spec, opts)

    states = trial_states(storage, spec)
    for tuning in spec.tunings:  # the budget, spent exactly beside the two FAIL trials
        tune, final = study_names(spec, tuning)
        assert states[tune]["COMPLETE"] + states[tune]["PRUNED"] == spec.settings.trials
        assert states[final] == {"COMPLETE": len(spec.settings.seeds)}
    opened = optuna_storage(storage).open()
    failed = {
        (name, t.number): t
        for name in trial_states(storage, spec)
        for t in optuna.load_study(study_name=name, storage=opened).trials
        if t.state.name == "FAIL"
    }
    assert set(failed) == {
        (no_run.study.study_name, no_run.trial.number),
        (with_run.study.study_name, with_run.trial.number),
    }
    client, found = runs(tracking, spec.name)
    assert not [r for r in found if r.info.status == "RUNNING"]
    killed = [r for r in found if r.info.status == "KILLED"]
    assert [r.info.run_id for r in killed] == [orphan]
    assert killed[0].data.tags["optuna_state"] == "FAIL"
    linked = failed[(with_run.study.study_name, with_run.trial.number)]
    assert linked.system_attrs["mlflow_run_id"] == orphan
    assert (
        "mlflow_run_id" not in failed[(no_run.study.study_name, no_run.trial.number)].system_attrs
    )
    body = write_report(tracking, spec.name, tmp_path / "reports", storage=storage)
    assert "1 failed trial(s) have no MLflow run" in body
    assert f"{no_run.study.study_name}#{no_run.trial.number}" in body


def run_in_process(capsys, *args: str) -> tuple[int, str]:
    """`mnist-study ARGS` in this process: (exit code, stderr)."""
    from mnist_study.cli import main

    code = main(["--data-root", str(REPO / "data"), *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("record", [b'{"hello": 1}', b'{"op_code": 99}', b"[1, 2, 3]"])
def test_journal_lines_that_are_json_but_no_record_are_refused(finished, tmp_path, capsys, record):
    spec, tracking, storage = copy_of(finished, tmp_path)
    lines = Path(storage).read_bytes().splitlines(keepends=True)
    Path(storage).write_bytes(b"".join(lines[:5] + [record + b"\n"] + lines[5:]))
    code, err = run_in_process(capsys, *run_args(spec, tracking, storage))
    assert code == 2 and err.count("\n") == 1
    assert f"{storage}: record 6 is corrupt" in err


def test_a_stale_lock_from_a_relative_journal_path_is_refused_not_waited_on(
    finished, tmp_path, capsys
):
    """Optuna's lock is a symlink to the journal; made from a relative path it points
    nowhere, and Optuna would retry forever. It is named in one line instead."""
    spec, tracking, storage = copy_of(finished, tmp_path)
    lock = Path(storage + ".lock")
    os.symlink("copy/optuna.journal", lock)  # what a relative path left behind
    code, err = run_in_process(capsys, *run_args(spec, tracking, storage))
    assert code == 2 and err.count("\n") == 1
    assert f"{lock}: a stale lock" in err and "remove" in err


@pytest.mark.slow
def test_a_stale_lock_on_the_absolute_journal_path_is_broken(finished, tmp_path):
    """Journals are opened by absolute path, so Optuna breaks a stale lock after its 30 s
    grace period: a lock held by a process killed with SIGKILL delays, never hangs."""
    spec, tracking, storage = copy_of(finished, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from optuna.storages.journal import JournalFileSymlinkLock\n"
            "JournalFileSymlinkLock(sys.argv[1]).acquire(); print('held', flush=True)\n"
            "time.sleep(600)",
            str(Path(storage).resolve()),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    holder.kill()
    holder.wait()
    assert os.path.islink(storage + ".lock")
    done = cli(*run_args(spec, tracking, storage), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not os.path.lexists(storage + ".lock")


def test_a_store_half_built_by_a_kill_is_refused_in_one_line(tmp_path, capsys):
    """Killed while MLflow created its tables (as older versions could be): the store has
    some tables and no schema version. Named, with what to do, before anything runs."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.initial_models import Base

    (tmp_path / "tiny.toml").write_text(TINY)
    tracking, storage = stores(tmp_path)
    Base.metadata.create_all(sqlalchemy.create_engine(tracking))  # tables, no migrations
    for command in (
        run_args(tmp_path / "tiny.toml", tracking, storage),
        ["report", "tiny", "--tracking-uri", tracking],
    ):
        code, err = run_in_process(capsys, *command)
        assert code == 2 and err.count("\n") == 1, err
        assert "unfinished MLflow store" in err and "holds no runs: remove it" in err
    assert not Path(storage).exists()


def test_a_new_store_is_built_aside_and_renamed_into_place(tmp_path):
    """What a kill during a build leaves is a `.building` file, never a half-built store:
    the next command builds afresh beside it."""
    from helpers import new_experiment

    tracking = stores(tmp_path)[0]
    (tmp_path / "mlflow.db.building").write_bytes(b"SQLite format 3\x00 and then a kill")
    experiment = new_experiment(tracking, "fresh")
    assert not (tmp_path / "mlflow.db.building").exists()
    assert MlflowClient(tracking).get_experiment(experiment).name == "fresh"


def test_a_corrupt_store_is_refused_in_one_line(finished, tmp_path, capsys):
    spec, tracking, storage = copy_of(finished, tmp_path)
    database = Path(tracking.removeprefix("sqlite:///"))
    data = bytearray(database.read_bytes())
    data[200:4096] = b"\x5a" * (4096 - 200)  # the schema page
    database.write_bytes(bytes(data))
    for command in (
        run_args(spec, tracking, storage),
        ["report", "tiny", "--tracking-uri", tracking],
    ):
        code, err = run_in_process(capsys, *command)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{database} is corrupt" in err and "restore it from a backup" in err


def test_two_designs_under_one_name_cannot_both_pass_the_check(tmp_path, mnist_root):
    """Started at once, both commands pass the preflight (nothing is recorded yet); the
    spec is compared again where it is recorded, under the store's lock."""
    from mnist_study.study.runner import preflight

    first, second = tmp_path / "a" / "pair.toml", tmp_path / "b" / "pair.toml"
    for path, text in (
        (first, TINY),
        (second, TINY.replace("trials = 2", "trials = 3", 1)),  # more seeds would extend it
    ):
        path.parent.mkdir()
        path.write_text(text)
    tracking, storage = stores(tmp_path)
    opts = RunOptions(tracking, storage, str(mnist_root))
    specs = load_spec(first), load_spec(second)
    first_stores, second_stores = (preflight(spec, opts) for spec in specs)
    first_stores.create()
    with pytest.raises(ConfigError, match=r"changed since study 'pair' started"):
        second_stores.create()


def test_a_trial_of_another_host_is_waited_on_aloud_then_presumed_dead(tmp_path, mnist_root):
    """A resume on a host with another name (a restarted container) cannot test the old
    pid: it says whose trial it waits on, and takes the trial back once it is silent for
    STALE_AFTER_S (minutes), proposing the same point again."""
    from mnist_study.study.optuna_storage import STALE_AFTER_S
    from mnist_study.study.scheduler import Idle
    from mnist_study.study.stores import StudyStores
    from mnist_study.study.worker import Worker

    (tmp_path / "tiny.toml").write_text(TINY.split("[variants.batchnorm]")[0])  # baseline
    spec = load_spec(tmp_path / "tiny.toml")
    tracking, storage = stores(tmp_path)
    opts = RunOptions(tracking, storage, str(mnist_root), quiet=True, log_models=False)
    worker = Worker(spec, opts, StudyStores(spec, tracking, storage).create(), 0)
    unit, _ = worker.next_unit()
    storage_ = unit.study._storage
    storage_.set_trial_system_attr(unit.trial._trial_id, "host", "old-container")
    storage_.set_trial_system_attr(unit.trial._trial_id, "heartbeat", time.time() - 30)
    assert worker.next_unit()[0] is Idle.WAIT
    [line] = worker.scheduler.waiting_on
    assert f"waiting on tiny.baseline#{unit.trial.number}, run by pid" in line
    assert "host old-container, last seen 30 s ago" in line
    storage_.set_trial_system_attr(
        unit.trial._trial_id, "heartbeat", time.time() - STALE_AFTER_S - 1
    )
    again, _ = worker.next_unit()
    assert unit.study.trials[unit.trial.number].state.name == "FAIL"
    assert (again.slot, again.trial.params) == (unit.slot, unit.trial.params)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_journal_deleted_or_replaced_mid_study_stops_the_worker(tmp_path, mnist_root, how):
    from mnist_study.errors import StorageLost
    from mnist_study.study.stores import StudyStores
    from mnist_study.study.worker import Worker

    (tmp_path / "tiny.toml").write_text(TINY)
    spec = load_spec(tmp_path / "tiny.toml")
    tracking, storage = stores(tmp_path)
    opts = RunOptions(tracking, storage, str(mnist_root), quiet=True, log_models=False)
    worker = Worker(spec, opts, StudyStores(spec, tracking, storage).create(), 0)
    worker.next_unit()
    if how == "deleted":
        os.unlink(storage)
    else:
        shutil.copy(storage, storage + ".copy")
        os.replace(storage + ".copy", storage)
    with pytest.raises(StorageLost, match=f"the Optuna journal was {how}"):
        worker.next_unit()


def test_a_run_left_running_after_its_trial_ended_is_named_then_closed(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    client, found = runs(tracking, "tiny")
    final = next(r for r in found if r.data.tags["role"] == "final")
    client.update_run(final.info.run_id, status="RUNNING")
    body = write_report(tracking, "tiny", tmp_path / "reports", storage=storage)
    assert "1 MLflow run(s) still RUNNING although their trial ended" in body
    assert "none raised" not in body
    done = run_main(*run_args(spec, tracking, storage))
    assert done.returncode == 0, done.stderr[-2000:]
    assert client.get_run(final.info.run_id).info.status == "FINISHED"
    body = write_report(tracking, "tiny", tmp_path / "reports", storage=storage)
    assert "still RUNNING" not in body


class SignalOnRelease(JournalFileSymlinkLock):
    """Optuna's journal lock, with SIGTERM delivered to this process mid-release: where
    CI's SIGTERM once landed (FileNotFoundError from Optuna instead of Interrupted)."""

    def release(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        super().release()


def test_a_signal_inside_a_journal_write_waits_for_the_write(tmp_path):
    path = tmp_path / "optuna.journal"
    storage = JournalStorage(SignalSafeJournal(str(path), SignalOnRelease(str(path))))
    with pytest.raises(Interrupted) as stopped, stopping_on_signals():
        optuna.create_study(study_name="s", storage=storage)
    assert stopped.value.signum == signal.SIGTERM
    assert not Path(str(path) + ".lock").exists(), "the journal's lock was left behind"
    assert not list(tmp_path.glob("*.rename"))
    assert optuna.get_all_study_names(optuna_storage(str(path)).connect()) == ["s"], (
        "the write was lost"
    )
