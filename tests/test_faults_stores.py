"""Faults in a study's stores: a lost, replaced, torn, corrupt, half-built or locked store,
or two designs under one name; each refused in one line or repaired, never rerun
beside the old runs. Real stores in tmp dirs, tiny real-MNIST specs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlflow.pytorch
import optuna
import pytest
from helpers import (
    TINY,
    cli,
    copy_of,
    copy_stores,
    one_line_error,
    run_args,
    runs,
    stores,
    trial_states,
)
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileSymlinkLock

from mnist_study.analysis.collect import collect
from mnist_study.analysis.publish import write_report
from mnist_study.analysis.summary import summarize
from mnist_study.errors import ConfigError
from mnist_study.study.optuna_storage import optuna_storage, refuse_dangling_lock
from mnist_study.study.runner import RunOptions, run_study
from mnist_study.study.spec_file import load_spec


def test_lost_optuna_storage_is_refused_not_rerun(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    before = len(runs(tracking, "tiny")[1])
    os.remove(storage)
    done = cli(*run_args(spec, tracking, storage), process=False)
    one_line_error(done, "Optuna storage", storage, "none of its trials", "restore", "new name")
    assert len(runs(tracking, "tiny")[1]) == before
    assert not Path(storage).exists()  # the refusal creates no empty storage


def test_lost_mlflow_store_is_refused(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    database = Path(tracking.removeprefix("sqlite:///"))
    database.unlink()
    for _ in range(2):  # the second attempt must not find a half-made store
        done = cli(*run_args(spec, tracking, storage), process=False)
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
    done = cli(*run_args(spec, tracking, storage), process=False)
    one_line_error(done, "not in")


def test_torn_journal_is_repaired_with_a_backup_and_resumes(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    journal = Path(storage)
    # Undo the last finished unit the way a crash mid-write leaves it: half a record.
    lines = journal.read_bytes().splitlines(keepends=True)
    last_tell = max(i for i, line in enumerate(lines) if b'"state":1' in line)
    journal.write_bytes(b"".join(lines[:last_tell]) + lines[last_tell][:25])
    done = cli(*run_args(spec, tracking, storage), process=False)
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
    one_line_error(
        cli(*run_args(spec, tracking, storage), process=False), "record 4 is corrupt", storage
    )


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


def test_report_never_creates_a_store(tmp_path):
    done = cli(
        "report", "tiny", "--tracking-uri", f"sqlite:///{tmp_path}/typo/mlflow.db", process=False
    )
    one_line_error(done, "no MLflow store at")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("record", [b'{"hello": 1}', b'{"op_code": 99}', b"[1, 2, 3]"])
def test_journal_lines_that_are_json_but_no_record_are_refused(finished, tmp_path, record):
    spec, tracking, storage = copy_of(finished, tmp_path)
    lines = Path(storage).read_bytes().splitlines(keepends=True)
    Path(storage).write_bytes(b"".join(lines[:5] + [record + b"\n"] + lines[5:]))
    done = cli(*run_args(spec, tracking, storage), process=False)
    code, err = done.returncode, done.stderr
    assert code == 2 and err.count("\n") == 1
    assert f"{storage}: record 6 is corrupt" in err


def test_a_stale_lock_from_a_relative_journal_path_is_refused_not_waited_on(finished, tmp_path):
    """Optuna's lock is a symlink to the journal; made from a relative path it points
    nowhere, and Optuna would retry forever. It is named in one line instead."""
    spec, tracking, storage = copy_of(finished, tmp_path)
    lock = Path(storage + ".lock")
    os.symlink("copy/optuna.journal", lock)  # what a relative path left behind
    done = cli(*run_args(spec, tracking, storage), process=False)
    code, err = done.returncode, done.stderr
    assert code == 2 and err.count("\n") == 1
    assert f"{lock}: a stale lock" in err and "remove" in err


def test_a_live_lock_released_while_it_is_checked_is_not_called_stale(tmp_path):
    """Two workers open the journal at once: one holds Optuna's lock and lets it go while
    the other checks for a stale one. 20,000 checks against a lock taken and released in
    a loop must never refuse."""
    journal = tmp_path / "optuna.journal"
    journal.write_text("")
    lock, stop = JournalFileSymlinkLock(str(journal.resolve())), threading.Event()

    def hold_and_release():
        while not stop.is_set():
            lock.acquire()
            lock.release()

    holder = threading.Thread(target=hold_and_release)
    holder.start()
    try:
        for _ in range(20_000):
            refuse_dangling_lock(journal)
    finally:
        stop.set()
        holder.join()


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


def test_a_store_half_built_by_a_kill_is_refused_in_one_line(tmp_path):
    """Killed while MLflow created its tables (as older versions could be): the store has
    some tables and no schema version. Named, with what to do, before anything runs."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.initial_models import Base

    (tmp_path / "tiny.toml").write_text(TINY)
    tracking, storage = stores(tmp_path)
    Base.metadata.create_all(sqlalchemy.create_engine(tracking))  # tables, no migrations
    for args in (
        run_args(tmp_path / "tiny.toml", tracking, storage),
        ["report", "tiny", "--tracking-uri", tracking],
    ):
        done = cli(*args, process=False)
        code, err = done.returncode, done.stderr
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


def test_a_corrupt_store_is_refused_in_one_line(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    database = Path(tracking.removeprefix("sqlite:///"))
    data = bytearray(database.read_bytes())
    data[200:4096] = b"\x5a" * (4096 - 200)  # the schema page
    database.write_bytes(bytes(data))
    for args in (
        run_args(spec, tracking, storage),
        ["report", "tiny", "--tracking-uri", tracking],
    ):
        done = cli(*args, process=False)
        code, err = done.returncode, done.stderr
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


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_journal_deleted_or_replaced_mid_study_stops_the_worker(tmp_path, mnist_root, how):
    from mnist_study.errors import StorageLost
    from mnist_study.study.runner import Worker
    from mnist_study.study.stores import StudyStores

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
    done = cli(*run_args(spec, tracking, storage), process=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert client.get_run(final.info.run_id).info.status == "FINISHED"
    body = write_report(tracking, "tiny", tmp_path / "reports", storage=storage)
    assert "still RUNNING" not in body


@pytest.mark.parametrize("made", ["by hand, no runs", "by hand, with runs", "by train"])
def test_report_plan_status_on_an_experiment_that_holds_no_study_are_one_line(tmp_path, made):
    """An experiment that `mnist-study run` did not make (the MLflow UI, another tool,
    `train --mlflow`): its runs carry none of a study's tags, so it is named, not read
    (status once called it "not started")."""
    tracking, _ = stores(tmp_path)
    client = MlflowClient(tracking)
    experiment = client.create_experiment("tiny")
    if made == "by hand, with runs":
        run = client.create_run(experiment, tags={"role": "final", "variant": "baseline"})
        client.log_metric(run.info.run_id, "accuracy/test", 0.9)
    elif made == "by train":
        client.set_experiment_tag(experiment, "mlflow.note.content", "a note, not a spec")
        client.create_run(experiment, tags={"role": "train"})
    (tmp_path / "tiny.toml").write_text(TINY.replace("trials = 2", "trials = 2\ntunings = 2", 1))
    spec = str(tmp_path / "tiny.toml")
    for args in (["report", "tiny"], ["plan", spec, "--pilot", "tiny"], ["status", spec]):
        done = cli(*args, "--tracking-uri", tracking, process=False, cwd=tmp_path)
        one_line_error(
            done, "MLflow experiment 'tiny'", "holds no study", "not by `mnist-study run`"
        )
    assert not (tmp_path / "reports").exists()
    listed = cli("studies", "--tracking-uri", tracking, process=False)
    assert listed.returncode == 0, listed.stderr
    assert "tiny" in listed.stdout and "(no study: made by hand" in listed.stdout


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but the (empty) lock files a reader of the stores takes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix != ".lock"
    }


@pytest.mark.parametrize("how", ["copied", "moved"])
def test_a_store_copied_or_moved_follows_itself_and_writes_nothing_elsewhere(
    finished, tmp_path, how
):
    """Its experiment records its artifact folder by absolute path: resumed as it was, a
    copy would write new models into the original's folder, a moved one would recreate
    the old. The store follows itself (saying so) and writes only into itself."""
    original = copy_stores(finished, tmp_path / "original")  # a store of this test's own
    place = tmp_path / "elsewhere"
    (shutil.copytree if how == "copied" else shutil.move)(original, place)
    kept = files_in(original) if how == "copied" else None
    spec = place / "tiny.toml"
    spec.write_text(TINY.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))  # units to run
    tracking, storage = stores(place)
    done = cli(*run_args(spec, tracking, storage), process=False)
    assert done.returncode == 0, done.stderr
    assert "the store was copied or moved" in done.stdout and "now follow it" in done.stdout
    report = cli("report", str(spec), "--tracking-uri", tracking, "--storage", storage,
                 "--out", str(tmp_path / "reports"), process=False)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert how == "copied" or not original.exists()  # a moved store's old folder stays gone
    assert how == "moved" or files_in(original) == kept  # the original: not one byte changed
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.artifact_location == (place / "artifacts" / "tiny").resolve().as_uri()
    found = client.search_runs([experiment.experiment_id], max_results=100)
    assert all(r.info.artifact_uri.startswith(experiment.artifact_location) for r in found)
    models = list((place / "artifacts" / "tiny" / "models").glob("*/artifacts/MLmodel"))
    assert len(models) == 2 * 3  # two variants' three seeds, the new ones among them
    mlflow.set_tracking_uri(tracking)
    for final in [r for r in found if r.data.tags.get("role") == "final"]:  # each loads
        assert mlflow.pytorch.load_model(f"runs:/{final.info.run_id}/model") is not None


def test_a_database_copied_without_its_artifacts_is_refused_naming_both(finished, tmp_path):
    original = copy_stores(finished, tmp_path / "original")
    place = tmp_path / "elsewhere"
    place.mkdir()
    for name in ("tiny.toml", "mlflow.db", "optuna.journal"):
        shutil.copy(original / name, place / name)
    tracking, storage = stores(place)
    before = files_in(place)
    done = cli(*run_args(place / "tiny.toml", tracking, storage), process=False)
    one_line_error(
        done, "keeps its artifacts in", str(original / "artifacts"),
        str(place / "artifacts"), "does not exist", "copy that folder beside it",
    )  # fmt: skip
    assert files_in(place) == before


def test_rounds_are_said_once_and_status_reads_an_extended_spec_before_its_run(tmp_path):
    """A study's round is said once when it ends. A spec raised to more tunings is read
    before `run` extends the storage (it once failed with Optuna's KeyError): the new round
    not started, the rounds finished offered to `report` by a command that reads them;
    another design is refused in run's words."""
    spec, (tracking, storage) = tmp_path / "rounds.toml", stores(tmp_path)
    small = TINY.replace("startup_trials = 2\n", "").replace(
        "trials = 2", "trials = 1\ntunings = 2"
    )
    spec.write_text(small.replace("seeds = [0, 1]", "seeds = [0]"))
    ran = cli(*run_args(spec, tracking, storage, "--workers", "2"))
    assert ran.returncode == 0, ran.stderr[-2000:]
    # Its first round's end is said once, by one of its two workers, with its report.
    said = "round 1 of 2 finished; read the first 1 (an interim read): mnist-study report "
    said += f"{spec} --tracking-uri {tracking} --storage {storage} --tunings 1\n"
    assert ran.stdout.count("round 1 of 2 finished") == 1 and said in ran.stdout
    spec.write_text(
        small.replace("seeds = [0, 1]", "seeds = [0]").replace("tunings = 2", "tunings = 3")
    )
    status = ["status", str(spec), "--tracking-uri", tracking, "--storage", storage]
    done = cli(*status, process=False)
    assert done.returncode == 0, done.stderr
    assert "8 of 12 units done" in done.stdout
    read = f"report {spec} --tracking-uri {tracking} --storage {storage} --tunings 2"
    assert (
        f"rounds finished: 2 of 3 (round 3: 0 of 4 units done); read them: mnist-study {read}"
        in done.stdout
    )
    report = cli(*read.split(), "--out", str(tmp_path / "reports"), process=False)
    assert report.returncode == 0, report.stderr
    assert (
        "Study `rounds` (2 tunings (sampler seeds 0, 1)"
        in (tmp_path / "reports/rounds/results.md").read_text()
    )
    # Seeds added to every round: no round is finished until they ran.
    spec.write_text(small.replace("tunings = 2", "tunings = 3"))
    assert (
        "rounds finished: 0 of 3 (round 1: 4 of 6 units done)\n"
        in cli(*status, process=False).stdout
    )
    spec.write_text(small.replace("epochs = 1", "epochs = 2"))
    one_line_error(cli(*status, process=False), str(spec), "changed since study", "[defaults]")


@pytest.mark.parametrize("journal", ["emptied", "another study's"])
def test_status_on_a_journal_that_lacks_the_study_says_so_in_one_line(finished, tmp_path, journal):
    spec, tracking, storage = copy_of(finished, tmp_path)
    Path(storage).write_bytes(b"")
    if journal == "another study's":
        optuna.create_study(study_name="other", storage=optuna_storage(storage).open())
    done = cli("status", str(spec), "--tracking-uri", tracking, "--storage", storage, process=False)
    one_line_error(done, "holds 8 runs of study 'tiny'", "has none of its trials", storage)


def test_report_and_status_on_a_journal_of_another_run_of_the_study_are_one_line(
    finished, tmp_path
):
    spec, tracking, storage = copy_of(finished, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "tiny.toml").write_text(TINY.replace("[study]", "[study]\nsampler_seed = 7", 1))
    done = cli(*run_args(other / "tiny.toml", *stores(other)), process=False)
    assert done.returncode == 0, done.stderr
    shutil.copyfile(stores(other)[1], storage)  # the same study's name, another run's trials
    args = ["--tracking-uri", tracking, "--storage", storage]
    for command in (["report", str(spec), "--out", str(tmp_path / "r")], ["status", str(spec)]):
        done = cli(*command, *args, process=False)
        one_line_error(done, storage, "links none of the 8 runs of study 'tiny'", "(--storage)")
    assert not (tmp_path / "r").exists()
