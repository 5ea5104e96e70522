"""Faults of processes: killed workers, signals to the command or to one worker, two
commands at once, a host that is gone. Finished trials are kept, the rest redone to
the same points. Real stores in tmp dirs, tiny real-MNIST specs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import (
    REPO,
    SLOW2,
    TINY,
    assert_budget_met_exactly,
    command,
    dead_pid,
    run_args,
    runs,
    start_slow_study,
    stores,
    trial_states,
    wait_for_running_trial,
)
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileSymlinkLock

from mnist_study.analysis.publish import write_report
from mnist_study.study.liveness import process_is_gone
from mnist_study.study.optuna_storage import SignalSafeJournal, optuna_storage, set_system_attrs
from mnist_study.study.runner import RunOptions, run_study
from mnist_study.study.signals import Interrupted, stopping_on_signals
from mnist_study.study.spec_file import load_spec
from mnist_study.study.stores import study_names


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
    children = [r for r in found if r.data.tags["role"] != "variant"]
    assert {r.info.run_id for r in children if r.info.status == "KILLED"} == linked
    # The cells it stopped are stopped too, not left on MLflow's RUNNING clock.
    parents = [r for r in found if r.data.tags["role"] == "variant"]
    assert parents and {r.info.status for r in parents} <= {"KILLED", "FINISHED"}


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
    procs = [
        subprocess.Popen(
            command(*run_args(path, tracking, storage)),
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


def test_a_zombie_worker_counts_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.05)
    assert process_is_gone(child.pid)  # exited, not yet collected by its parent
    child.wait()
    assert process_is_gone(child.pid) and not process_is_gone(os.getpid())


def test_a_worker_killed_between_claiming_and_recording_its_run(tmp_path, mnist_root):
    """The two boundaries a kill can hit between Optuna's record and MLflow's mirror: a
    worker dead after claiming a trial but before creating its run, and one dead after
    creating the run but before recording its id on the trial. On resume both trials are
    FAIL and redone; the run found by its tags is linked and KILLED, none stays RUNNING;
    the report names the trial with no run."""
    from mnist_study.study.runner import Worker
    from mnist_study.study.stores import StudyStores

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    spec = load_spec(path)
    tracking, storage = stores(tmp_path)
    opts = RunOptions(tracking, storage, str(mnist_root), quiet=True, log_models=False)
    worker = Worker(spec, opts, StudyStores(spec, tracking, storage).create(), 0)
    (no_run, _), (with_run, _) = worker.next_unit(), worker.next_unit()
    orphan = worker.create_run(with_run)[3]  # created; its id never reaches the trial
    for unit in (no_run, with_run):
        set_system_attrs(unit.study, unit.trial, {"pid": dead_pid()})

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


def tiny_worker(tmp_path, mnist_root):
    """A worker of the tiny study (baseline alone) on fresh stores, in this process."""
    from mnist_study.study.runner import Worker
    from mnist_study.study.stores import StudyStores

    (tmp_path / "tiny.toml").write_text(TINY.split("[variants.batchnorm]")[0])
    spec = load_spec(tmp_path / "tiny.toml")
    tracking, storage = stores(tmp_path)
    opts = RunOptions(tracking, storage, str(mnist_root), quiet=True, log_models=False)
    return Worker(spec, opts, StudyStores(spec, tracking, storage).create(), 0)


@pytest.mark.parametrize("skew", [-600, 600])
def test_a_trial_of_another_host_is_waited_on_by_this_hosts_clock(
    tmp_path, mnist_root, monkeypatch, skew
):
    """A trial of another host (a restarted container; its pid cannot be tested), whose
    clock is 10 minutes off: waited on aloud, never reaped for its heartbeat's value;
    taken back once silent for the stale limit on this host's clock, its point proposed
    again."""
    from mnist_study.study.scheduler import Idle

    worker = tiny_worker(tmp_path, mnist_root)
    unit, _ = worker.next_unit()
    set_system_attrs(unit.study, unit.trial, {"host": "old-container"})
    set_system_attrs(unit.study, unit.trial, {"heartbeat": time.time() + skew})
    assert worker.next_unit()[0] is Idle.WAIT
    [line] = worker.scheduler.waiting_on
    assert f"waiting on tiny.baseline#{unit.trial.number}, run by pid" in line
    assert "host old-container, no sign for 0 s (presumed dead after 300 s" in line
    monkeypatch.setenv("MNIST_STUDY_STALE_AFTER_S", "1")
    set_system_attrs(unit.study, unit.trial, {"heartbeat": time.time() + skew + 1})
    assert worker.next_unit()[0] is Idle.WAIT  # a new sign: alive, however old it reads
    time.sleep(1.2)
    again, _ = worker.next_unit()
    assert unit.study.trials[unit.trial.number].state.name == "FAIL"
    assert (again.slot, again.trial.params) == (unit.slot, unit.trial.params)


def test_a_reused_pid_is_not_the_trials_owner(tmp_path, mnist_root):
    """A resume in a fresh PID namespace where the dead worker's pid is this process: the
    owner's start time tells them apart, so the trial is reaped, not waited on forever."""
    from mnist_study.study.liveness import process_start

    worker = tiny_worker(tmp_path, mnist_root)
    unit, _ = worker.next_unit()
    old = {"pid": os.getpid(), "started": process_start(os.getpid()) - 100}
    set_system_attrs(unit.study, unit.trial, old)
    again, _ = worker.next_unit()
    trial = unit.study.trials[unit.trial.number]
    assert trial.state.name == "FAIL" and "worker died" in trial.user_attrs["fail_reason"]
    assert (again.slot, again.trial.params) == (unit.slot, unit.trial.params)


@pytest.mark.slow
def test_a_worker_whose_trial_was_taken_leaves_it_and_goes_on(tmp_path):
    """Stopped (SIGSTOP) while another process reaped its trial as dead and killed its
    run, then continued: it writes nothing more to either, says so in a line, and the
    study ends complete with the trial redone."""
    from mnist_study.study.optuna_storage import fail_trial

    proc, path, tracking, storage = start_slow_study(tmp_path, "--workers", "1")
    victim = wait_for_running_trial(storage, "slow.baseline", None)
    os.kill(proc.pid, signal.SIGSTOP)
    study = optuna.load_study(study_name="slow.baseline", storage=optuna_storage(storage).open())
    run_id = victim.system_attrs["mlflow_run_id"]
    fail_trial(study, victim, "worker died (presumed dead: no sign for 300 s)")
    client, _ = runs(tracking, "slow")
    client.set_terminated(run_id, "KILLED")
    points = len(client.get_metric_history(run_id, "accuracy/validation"))
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert f"slow.baseline#{victim.number} was ended as FAIL by another process" in out
    assert client.get_run(run_id).info.status == "KILLED"
    assert len(client.get_metric_history(run_id, "accuracy/validation")) == points
    states = trial_states(storage, load_spec(path))
    tuned = states["slow.baseline"]
    assert tuned["COMPLETE"] + tuned["PRUNED"] == 2 and tuned["FAIL"] == 1
    assert states["slow.baseline.final"] == {"COMPLETE": 1}


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
