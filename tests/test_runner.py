"""The study runner end to end, against real MLflow (SQLite) and Optuna (journal) stores
in tmp dirs: what lands where, resuming, a SIGKILLed worker, NaN trials, 2 workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import optuna
import pytest
from helpers import (
    REPO,
    assert_budget_met_exactly,
    cli,
    command,
    copy_of,
    run_args,
    runs,
    shrink,
    stores,
    trial_states,
)
from mlflow.tracking import MlflowClient

from mnist_study.analysis.collect import collect
from mnist_study.analysis.publish import write_report
from mnist_study.intervals import acc_interval
from mnist_study.store_paths import file_lock
from mnist_study.study.optuna_storage import optuna_storage
from mnist_study.study.runner import RunOptions, run_study
from mnist_study.study.spec_file import load_spec
from mnist_study.study.stores import study_names
from mnist_study.tracking.legacy import recorded_spec_text
from mnist_study.tracking.runs import Tracker
from mnist_study.tracking.store import ExperimentStore, creation_lock, find_experiment, sqlite_file
from mnist_study.training.config import TrainConfig


def test_every_variant_has_its_trials_and_final_seeds(smoke_study):
    spec, tracking, storage = smoke_study
    _, found = runs(tracking, spec.name)
    trials, seeds = spec.settings.trials, len(spec.settings.seeds)
    for v in spec.variants:
        mine = [r for r in found if r.data.tags.get("variant") == v.name]
        roles = [r.data.tags["role"] for r in mine]
        assert roles.count("tune") == trials and roles.count("final") == seeds
        assert roles.count("variant") == 1
    states = trial_states(storage, spec)
    for v in spec.variants:
        tune = states[f"smoke.{v.name}"]
        assert tune["COMPLETE"] + tune["PRUNED"] == trials and not tune["FAIL"]
        assert states[f"smoke.{v.name}.final"] == {"COMPLETE": seeds}


def test_children_hang_off_parents_with_curves_tags_and_test_only_on_finals(smoke_study):
    spec, tracking, _ = smoke_study
    client, found = runs(tracking, spec.name)
    parents = {r.info.run_id: r for r in found if r.data.tags["role"] == "variant"}
    epochs = spec.defaults.epochs
    for run in found:
        tags = run.data.tags
        if tags["role"] == "variant":
            assert run.info.status == "FINISHED"
            continue
        parent = parents[tags["mlflow.parentRunId"]]
        assert parent.data.tags["variant"] == tags["variant"]
        assert run.info.run_name.startswith(tags["variant"] + "/")
        for key in (
            "git_commit",
            "torch_version",
            "torchvision_version",
            "optuna_version",
            "mlflow_version",
            "device",
            "precision",
            "threads",
            "optuna_state",
            "mnist_md5.t10k-images-idx3-ubyte",
        ):
            assert tags[key], key
        assert run.data.params["epochs"] == str(epochs)
        history = client.get_metric_history(run.info.run_id, "accuracy/validation")
        steps = [m.step for m in history]
        assert steps == list(range(1, len(steps) + 1))
        if tags["optuna_state"] == "COMPLETE":
            assert len(steps) == epochs and run.info.status == "FINISHED"
        else:
            assert tags["optuna_state"] == "PRUNED" and tags["prune_reason"]
        assert ("accuracy/test" in run.data.metrics) == (tags["role"] == "final")


def test_parent_holds_best_params_and_test_mean(smoke_study):
    spec, tracking, _ = smoke_study
    _, found = runs(tracking, spec.name)
    for v in spec.variants:
        parent = next(
            r for r in found if r.data.tags == r.data.tags | {"role": "variant", "variant": v.name}
        )
        finals = [
            r
            for r in found
            if r.data.tags.get("variant") == v.name and r.data.tags["role"] == "final"
        ]
        accs = [r.data.metrics["accuracy/test"] for r in finals]
        # In percent: what a reader of the table compares with the report.
        assert parent.data.metrics["test_acc_mean"] == pytest.approx(
            100 * sum(accs) / len(accs), abs=1e-4
        )
        assert parent.data.metrics["seeds"] == len(spec.settings.seeds)
        # The report's 95% interval (over the seeds of its one tuning), as columns.
        _, low, high, _ = acc_interval([accs])
        assert parent.data.metrics["test_acc_mean_lo95"] == pytest.approx(100 * low, abs=1e-4)
        assert parent.data.metrics["test_acc_mean_up95"] == pytest.approx(100 * high, abs=1e-4)
        assert {f"best_{k}" for k in v.search} <= set(parent.data.params)
        # Final runs train the tuned hyperparameters.
        for run in finals:
            assert run.data.params["lr"] == parent.data.params["best_lr"]


def test_final_runs_log_a_loadable_model(smoke_study, small_splits):
    import mlflow.pytorch

    spec, tracking, _ = smoke_study
    _, found = runs(tracking, spec.name)
    final = next(r for r in found if r.data.tags["role"] == "final")
    mlflow.set_tracking_uri(tracking)
    model = mlflow.pytorch.load_model(f"runs:/{final.info.run_id}/model")
    assert model(small_splits.val_x[:4]).shape == (4, 10)


def test_running_again_redoes_nothing(smoke_study, mnist_root):
    spec, tracking, storage = smoke_study
    before = len(runs(tracking, spec.name)[1])
    run_study(spec, RunOptions(tracking, storage, str(mnist_root)))
    assert len(runs(tracking, spec.name)[1]) == before


def test_a_finished_study_is_answered_without_workers(finished, tmp_path, monkeypatch):
    """Nothing to run: said, with the commands that read it; under make, whose target
    reports next, without the report's."""
    args = run_args(*copy_of(finished, tmp_path), "--workers", "2")
    done = cli(*args, process=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "study 'tiny' is complete: all 8 units done; nothing to run" in lines
    assert not [line for line in lines if line.startswith(("[w", "worker "))]
    assert "Report: " in lines[-1] and "Browse: " in lines[-1]
    monkeypatch.setenv("MAKELEVEL", "1")
    last = cli(*args, process=False).stdout.splitlines()[-1]
    assert "Report: " not in last and "Browse: " in last


EXPERIMENTS = sorted((REPO / "experiments").glob("*.toml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_file_runs_shrunk(tmp_path, mnist_root, path):
    spec = shrink(load_spec(path))
    tracking, storage = stores(tmp_path)
    run_study(spec, RunOptions(tracking, storage, str(mnist_root), log_models=False))
    states = trial_states(storage, spec)
    assert all(s["COMPLETE"] + s["PRUNED"] == 1 for s in states.values())


def test_nan_trials_are_pruned_with_reason_and_the_study_goes_on(tmp_path, mnist_root):
    path = tmp_path / "nan.toml"
    path.write_text("""
[study]
trials = 2
seeds = [0]
[defaults]
epochs = 1
train_size = 300
val_size = 200
train_eval_size = 200
test_size = 500
[variants.absurd]
set = { optimizer = "sgd", weight_decay = 10.0 }
search.lr = { low = 8, high = 10 }
[variants.sane]
search.lr = { low = 1e-3, high = 2e-3 }
""")
    tracking, storage = stores(tmp_path)
    spec = load_spec(path)
    run_study(spec, RunOptions(tracking, storage, str(mnist_root), log_models=False))
    states = trial_states(storage, spec)
    assert states["nan.absurd"] == {"PRUNED": 2}
    assert states["nan.sane"]["COMPLETE"] >= 1 and states["nan.sane.final"] == {"COMPLETE": 1}
    _, found = runs(tracking, "nan")
    absurd = [
        r for r in found if r.data.tags.get("variant") == "absurd" and r.data.tags["role"] == "tune"
    ]
    assert all(r.info.status == "FAILED" for r in absurd)
    assert all(r.data.tags["prune_reason"].startswith("diverged: loss became") for r in absurd)
    # The report counts them as ended: a study whose trials diverged is not left partial.
    ended = [r for r in found if r.data.tags["role"] in ("tune", "final")]
    assert collect(tracking, "nan", storage).progress()[0] == len(ended) == 5


def test_resuming_with_a_changed_study_file_is_refused(smoke_study, tmp_path):
    spec, tracking, storage = smoke_study
    base = REPO / "experiments" / "ablations.toml"
    original = spec.path.read_text().replace('"ablations.toml"', f'"{base}"')  # moved away
    before = len(runs(tracking, spec.name)[1])
    args = ["--tracking-uri", tracking, "--storage", storage, "--quiet"]
    changed = tmp_path / "changed" / "smoke.toml"
    changed.parent.mkdir()
    changed.write_text(original.replace("trials = 2", "trials = 3", 1))
    done = cli("run", str(changed), *args, process=False)
    assert done.returncode == 2
    assert done.stderr.startswith(f"mnist-study: error: {changed}: changed since study 'smoke'")
    assert "([study])" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert len(runs(tracking, spec.name)[1]) == before
    # Reworded comments and descriptions are the same design: it resumes (nothing to do).
    reworded = tmp_path / "smoke.toml"
    text = original + '[variants.baseline]\ndescription = "reworded"\n'
    reworded.write_text('# reworded\ndescription = "reworded"\n' + text)
    done = cli("run", str(reworded), *args, process=False)
    assert done.returncode == 0, done.stderr
    assert len(runs(tracking, spec.name)[1]) == before


KILL_SPEC = """
[study]
trials = 2
seeds = [0]
[defaults]
epochs = 2
train_size = 2000
val_size = 200
train_eval_size = 200
test_size = 500
[variants.first]
search.lr = { low = 1e-3, high = 2e-3 }
[variants.second]
set = { batchnorm = true }
search.lr = { low = 1e-3, high = 2e-3 }
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_mid_trial_then_resumed(tmp_path, sig):
    path = tmp_path / "kill.toml"
    path.write_text(KILL_SPEC)
    tracking, storage = stores(tmp_path)
    args = ["run", str(path), "--tracking-uri", tracking, "--storage", storage, "--quiet"]
    proc = subprocess.Popen(
        command(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    # Wait until a trial is mid-way: RUNNING with one of its 2 epochs reported. The test
    # took 125 s in a CI run whose tiers shared 2 cores; 300 s bounds a hang, as in helpers.
    deadline = time.time() + 300
    killed_trial = opened = None
    while killed_trial is None and time.time() < deadline:
        time.sleep(0.2)
        if not os.path.exists(storage):
            continue
        opened = (
            opened or optuna_storage(storage).connect()
        )  # one reader: it reads only what is new
        try:
            study = optuna.load_study(study_name="kill.first", storage=opened)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False):
            if t.state.name == "RUNNING" and len(t.intermediate_values) == 1 and t.number == 1:
                killed_trial = t.number
    proc.send_signal(sig)
    code = proc.wait()
    assert killed_trial is not None, "no trial reached mid-training in time"
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    # Ctrl-C stops the parent runs of unfinished cells (a kill -9 cannot); they are
    # reopened by the resume and finished by it.
    parents = {
        r.info.run_name: r.info.status
        for r in runs(tracking, "kill")[1]
        if r.data.tags["role"] == "variant"
    }
    assert parents["first"] == ("KILLED" if sig == signal.SIGINT else "RUNNING")
    # The report of the interrupted study says what is missing.
    body = write_report(tracking, "kill", tmp_path / "reports")
    assert "first: tuning incomplete (1 of 2 trials)" in body
    assert "second: not started" in body and "Traceback" not in body

    done = cli(*args, process=False)
    assert done.returncode == 0, done.stderr
    spec = load_spec(path)
    states = trial_states(storage, spec)
    assert states["kill.first"]["FAIL"] == 1
    assert states["kill.first"]["COMPLETE"] + states["kill.first"]["PRUNED"] == 2
    assert states["kill.second"]["COMPLETE"] + states["kill.second"]["PRUNED"] == 2
    assert states["kill.first.final"] == states["kill.second.final"] == {"COMPLETE": 1}
    study = optuna.load_study(study_name="kill.first", storage=optuna_storage(storage).open())
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    reason = "interrupted" if sig == signal.SIGINT else "worker died"
    assert failed.number == killed_trial and reason in failed.user_attrs["fail_reason"]
    _, found = runs(tracking, "kill")
    by_trial = {
        (r.data.tags["variant"], r.data.tags.get("optuna_trial")): r
        for r in found
        if r.data.tags["role"] == "tune"
    }
    dead = by_trial[("first", str(killed_trial))]
    assert dead.info.status == "KILLED" and dead.data.tags["optuna_state"] == "FAIL"
    children = [r for r in found if r.data.tags["role"] != "variant"]
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert {r.info.status for r in found if r.data.tags["role"] == "variant"} == {"FINISHED"}
    assert len([r for r in children if r.data.tags["role"] == "tune"]) == 2 + 2 + 1


def test_the_experiment_opens_as_model_training_with_a_readable_description(smoke_study):
    spec, tracking, _ = smoke_study
    exp = MlflowClient(tracking).get_experiment_by_name(spec.name)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    note = exp.tags["mlflow.note.content"]
    assert not note.lstrip().startswith("#") and "[study]" not in note  # no raw TOML
    assert f"mnist-study run {spec.path}" in note and "2 trials" in note
    # The experiment list shows a tag's first line: a summary; the spec follows as JSON.
    summary, recorded = exp.tags["mnist_study.spec"].split("\n")
    assert summary.startswith("smoke.toml: 8 variants x 1 size; 2 trials, 2 seeds, 1 tuning ")
    assert load_spec(spec.path).record() == recorded_spec_text(exp.tags) == recorded


def test_runs_carry_their_data_and_source_the_mlflow_way(smoke_original, smoke_study):
    """Every run, parents too, names the command that made it (with its stores) and the
    data it read, so the UI's Source and Dataset columns are filled."""
    import shlex

    spec, tracking, _ = smoke_study
    made_in = smoke_original[1]  # the stores the study ran into, before they were copied
    command = shlex.join(
        ["mnist-study", "run", str(spec.path), "--tracking-uri", f"sqlite:///{made_in}/mlflow.db"]
        + ["--storage", str(made_in / "optuna.journal"), "--workers", "1"]
    )
    client, found = runs(tracking, spec.name)
    for run in found:
        tags = run.data.tags
        assert tags["mlflow.source.name"] == command
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        contexts = {
            next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
            for i in inputs
        }
        if tags["role"] == "variant":
            assert set(contexts) == {"train", "validation", "test"}
            continue
        assert tags["mlflow.source.git.commit"] == tags["git_commit"].removesuffix("-dirty")
        # Charts group by the prefix: each section holds train beside validation.
        sections = {k.split("/")[0] for k in run.data.metrics}
        assert {"accuracy", "loss"} <= sections and all("/" in k for k in run.data.metrics)
        assert {"accuracy/train", "accuracy/validation"} <= set(run.data.metrics)
        expected = {"train", "validation"} | ({"test"} if tags["role"] == "final" else set())
        assert set(contexts) == expected
        assert contexts["train"].name == f"mnist-train-{spec.defaults.train_size}"
        assert len({d.digest for d in contexts.values()}) == len(contexts)


def test_optuna_studies_say_what_they_are(smoke_study):
    """optuna-dashboard lists tuning and final-seed studies alike: their metric name and
    `role` attribute tell them apart."""
    spec, _, storage = smoke_study
    opened = optuna_storage(storage).open()
    for tuning in spec.tunings:
        tune, final = (
            optuna.load_study(study_name=n, storage=opened) for n in study_names(spec, tuning)
        )
        assert tune.metric_names == ["validation accuracy at the last evaluation"]
        assert tune.user_attrs["role"].startswith(f"tuning of {tuning.cell.key}, tuning 0")
        assert final.metric_names[0].endswith(
            "of a final seed (its test accuracy: user attribute test_acc)"
        )
        assert final.user_attrs["role"].startswith(f"final seeds of {tuning.cell.key}")


def test_workers_logging_a_new_dataset_at_once_all_link_to_one_row(tmp_path):
    """MLflow checks for a dataset, then inserts it; workers starting their first runs
    together race on that, and every one of them must still get its run and inputs."""
    tracking = stores(tmp_path)[0]
    experiment = MlflowClient(tracking).create_experiment("race")
    cfg, n = TrainConfig(train_size=300), 8
    barrier = threading.Barrier(n)

    def start(i: int) -> str:
        tracker = Tracker(tracking, experiment)
        barrier.wait()
        return tracker.create_run(f"run{i}", cfg, {}, True, "test")

    with ThreadPoolExecutor(n) as pool:
        run_ids = list(pool.map(start, range(n)))
    client = MlflowClient(tracking)
    digests = [{i.dataset.digest for i in client.get_run(r).inputs.dataset_inputs} for r in run_ids]
    assert len(digests) == n and all(d == digests[0] and len(d) == 3 for d in digests)


def test_a_command_looking_at_a_store_being_created_waits_for_it(tmp_path):
    """A second command, checking the store before it takes any lock, found the database
    file of one the first command was still creating, and ran MLflow's migrations on it
    too (CI: "expected to match one row ... 0 found"). It must wait, then see it whole."""
    tracking = stores(tmp_path)[0]
    database = sqlite_file(tracking)
    found = []
    with file_lock(creation_lock(database)):  # as experiment_store holds it while creating
        database.touch()
        looking = threading.Thread(target=lambda: found.append(find_experiment(tracking, "s")))
        looking.start()
        looking.join(timeout=1)
        assert looking.is_alive()  # waiting, not reading a store that has no tables yet
        created = ExperimentStore(tracking).open("s")  # what experiment_store yields
    looking.join(timeout=60)
    assert [e.experiment_id for e in found] == [created]


@pytest.mark.slow
def test_two_workers_share_the_budget_exactly_and_tag_their_console_lines(tmp_path):
    """Two workers into stores that are not the defaults: every unit run once, the cores
    shared; no INFO noise, every line a worker prints says which worker, and the last
    line's report command works as pasted."""
    import shlex

    from helpers import TINY

    (tmp_path / "tiny.toml").write_text(TINY)
    tracking, storage = stores(tmp_path)
    done = cli(
        "run", str(tmp_path / "tiny.toml"), "--tracking-uri", tracking, "--storage", storage,
        "--workers", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "locked" not in done.stderr
    found = assert_budget_met_exactly(tracking, storage, load_spec(tmp_path / "tiny.toml"))
    assert "[w0 " in done.stdout and "[w1 " in done.stdout  # both workers took units
    threads = {r.data.tags["threads"] for r in found if r.data.tags["role"] != "variant"}
    assert threads == {"1"}  # the default, whatever the worker count
    assert "INFO" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert not [line for line in lines if line.startswith(("    ", "baseline", "batchnorm"))]
    assert any(line.startswith("[w0] ") for line in lines)
    assert any(line.startswith("[w1] ") for line in lines)
    assert any("step" in line or "epoch" in line for line in lines if line.startswith("[w"))
    last = lines[-1]
    assert f"complete in MLflow {tracking} and Optuna {storage}" in last
    report = shlex.split(last.split("Report: ")[1].split("   Browse: ")[0])
    # mnist-study as the shell can run it: by name on PATH, else the venv's script
    assert report[0] == "mnist-study" or os.access(REPO / report[0], os.X_OK), report[0]
    assert report[1] == "report" and tracking in report and storage in report
    again = cli(*report[1:], cwd=tmp_path, process=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Checks**: none raised" in again.stdout
    assert last.endswith(f"{report[0]} ui --tracking-uri {tracking}")  # Browse: the same way


def test_studies_lists_links_to_each_studys_runs_in_model_training_mode(smoke_study, capsys):
    from mnist_study.cli import main

    spec, tracking, _ = smoke_study
    assert main(["studies", "--tracking-uri", tracking, "--ui", "http://127.0.0.1:5000/"]) == 0
    experiment = MlflowClient(tracking).get_experiment_by_name(spec.name)
    page = f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    link = f"http://127.0.0.1:5000/{page}&viewStateShareKey=cells"  # the study's saved view
    assert f"  {spec.name:<12} {link}" in capsys.readouterr().out.splitlines()
    view = json.loads(experiment.tags["mlflow.sharedViewState.cells"])
    assert view["searchFilter"] == "tags.role = 'variant'"
    assert view["selectedColumns"][0] == "metrics.`test_acc_mean`"
    assert {f"params.`best_{k}`" for v in spec.variants for k in v.search} <= set(
        view["selectedColumns"]
    )
