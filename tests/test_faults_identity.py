"""A study's identity: a resume on other code, threads or device is refused in one line
naming what differs (or, with --allow-mixed, recorded and reported); an experiment that
holds no study is no study's home. Real stores, the tiny study."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from helpers import TINY, cli, copy_of, new_experiment, one_line_error, run_args, runs, stores
from mlflow.tracking import MlflowClient

from mnist_study.analysis.publish import write_report
from mnist_study.study.record import changed_code, code_version
from mnist_study.tracking.names import IDENTITY_TAG, MIXED_TAG
from mnist_study.tracking.runs import git_commit


def recorded_identity(tracking: str) -> dict:
    return json.loads(MlflowClient(tracking).get_experiment_by_name("tiny").tags[IDENTITY_TAG])


def as_if_recorded(tracking: str, **identity: str) -> None:
    """The identity tag as a study started on other code or another device wrote it."""
    client = MlflowClient(tracking)
    found = client.get_experiment_by_name("tiny")
    tag = json.loads(found.tags[IDENTITY_TAG]) | identity
    client.set_experiment_tag(found.experiment_id, IDENTITY_TAG, json.dumps(tag))


def test_a_study_records_what_its_numbers_are_a_function_of(finished):
    tracking, _ = stores(finished)
    assert recorded_identity(tracking) == {
        "code": code_version(), "threads": "1", "device": "cpu", "data": "c9b60a983961",
        "commit": git_commit(),
    }  # fmt: skip


def test_a_resume_on_other_code_or_device_is_refused_naming_both(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    spec.write_text(TINY.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))  # units left to run
    before = (len(runs(tracking, "tiny")[1]), Path(storage).read_bytes())
    as_if_recorded(tracking, code="0" * 40, commit="ab" * 20)
    done = cli(*run_args(spec, tracking, storage), process=False)
    one_line_error(
        done,
        "started at commit abababababab, this checkout runs ",  # edited or another commit's
        f"Its report needs none of this: mnist-study report {spec}.",
        "To resume: check out a commit with its code (abababababab), pass --allow-mixed",
        "or use another store (--tracking-uri, --storage)",
    )
    assert "--allow-mixed" in done.stderr
    as_if_recorded(tracking, code=code_version(), device="cuda")
    done = cli(*run_args(spec, tracking, storage), process=False)
    one_line_error(done, "ran with other device (device cuda -> cpu)")
    assert (len(runs(tracking, "tiny")[1]), Path(storage).read_bytes()) == before


def test_a_finished_study_on_other_code_says_it_is_complete_and_runs_nothing(finished, tmp_path):
    """Editing the code after a study finished (README's 'Adding a variant') must not
    strand it: nothing would run, so nothing would mix."""
    spec, tracking, storage = copy_of(finished, tmp_path)
    as_if_recorded(tracking, code="0" * 40)
    tags = MlflowClient(tracking).get_experiment_by_name("tiny").tags
    before = (len(runs(tracking, "tiny")[1]), Path(storage).read_bytes())
    done = cli(*run_args(spec, tracking, storage), process=False)
    assert done.returncode == 0, done.stderr
    assert "study 'tiny' is complete: every unit ran, on other code" in done.stdout
    assert "this checkout runs " in done.stdout and "code 0000" not in done.stdout  # words
    assert f"Its report: mnist-study report {spec}" in done.stdout
    assert (len(runs(tracking, "tiny")[1]), Path(storage).read_bytes()) == before
    assert MlflowClient(tracking).get_experiment_by_name("tiny").tags == tags  # no mix recorded
    # A changed design is still refused, finished or not.
    spec.write_text(TINY.replace("trials = 2", "trials = 3"))
    one_line_error(cli(*run_args(spec, tracking, storage), process=False), "changed since")


def test_other_threads_are_refused_then_allowed_mixed_and_reported(finished, tmp_path):
    """A study of 1 thread per run, extended by a seed, resumed with --threads 2:
    refused. With --allow-mixed: the new runs run with 2, the mix is recorded, and the
    report says how many runs ran with each."""
    spec, tracking, storage = copy_of(finished, tmp_path)
    spec.write_text(TINY.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))  # units left to run
    before = (len(runs(tracking, "tiny")[1]), Path(storage).read_bytes())
    done = cli(*run_args(spec, tracking, storage, "--threads", "2"), process=False)
    one_line_error(done, "ran with other threads (threads 1 -> 2)", "pass the --threads")
    assert (len(runs(tracking, "tiny")[1]), Path(storage).read_bytes()) == before
    done = cli(*run_args(spec, tracking, storage, "--threads", "2", "--allow-mixed"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert recorded_identity(tracking)["threads"] == "2"
    tags = MlflowClient(tracking).get_experiment_by_name("tiny").tags
    assert tags[MIXED_TAG] == "threads 1 -> 2"
    body = write_report(tracking, "tiny", tmp_path / "reports", storage=storage)
    assert "resumed mixed (--allow-mixed): threads 1 -> 2" in body
    assert "thread(s) per run 1 (8 runs), 2 (2 runs);" in body


def test_an_experiment_that_holds_no_study_is_refused_before_any_write(tmp_path):
    """Made first by `mnist-study train --mlflow tiny`: a study named tiny would record
    no spec there, so a later edit of the spec would go unrefused."""
    (tmp_path / "tiny.toml").write_text(TINY)
    tracking, storage = stores(tmp_path)
    new_experiment(tracking, "tiny")
    done = cli(*run_args(tmp_path / "tiny.toml", tracking, storage), process=False)
    one_line_error(done, "MLflow experiment 'tiny'", "holds no study", "another name")
    assert not Path(storage).exists() and runs(tracking, "tiny")[1] == []


def test_an_edit_of_the_report_is_the_same_code_and_an_edit_of_training_is_not(tmp_path):
    """A study refuses to resume on other code; the report's and the command line's code
    make no number, so editing them must not strand a study that has run for hours."""

    def commit(path: str, text: str) -> None:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", "-A")
        git("commit", "-qm", path)

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True)  # fmt: skip

    version = code_version.__wrapped__  # uncached: the repository changes under it
    git("init", "-q")
    for path in ("mnist_study/training/train.py", "mnist_study/analysis/report.py",
                 "mnist_study/cli.py", "mnist_study/commands.py", "README.md"):  # fmt: skip
        commit(path, "one\n")
    first = version(tmp_path)
    started = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    for path in ("mnist_study/analysis/report.py", "mnist_study/cli.py",
                 "mnist_study/commands.py", "README.md", "tests/test_it.py"):  # fmt: skip
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("two\n")
        assert version(tmp_path) == first, path
        commit(path, "two\n")
        assert version(tmp_path) == first, path
    (tmp_path / "mnist_study/training/train.py").write_text("two\n")
    edited = version(tmp_path)
    assert edited.startswith(first + "+")
    (tmp_path / "mnist_study/training/train.py").write_text("three\n")
    assert version(tmp_path) not in (first, edited)
    commit("mnist_study/training/train.py", "two\n")
    assert "+" not in version(tmp_path) and version(tmp_path) != first
    # The refusal names the files of unit code changed since the study's commit alone.
    (tmp_path / "mnist_study/training/step.py").write_text("new\n")
    git("add", "-N", "mnist_study/training/step.py")  # known to git, not committed
    changed = ["mnist_study/training/step.py", "mnist_study/training/train.py"]
    assert changed_code(started, tmp_path) == changed
    assert changed_code("f" * 40, tmp_path) == []  # a commit this clone lacks
