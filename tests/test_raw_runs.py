"""A page's raw runs (docs/data/STUDY-runs.csv and -curves.csv): what they hold, and that
they alone rebuild the page: `report --runs` gives the store's tables, and Welch's t on
the tuning means, computed from the CSV with scipy, gives the page's numbers. And a study
whose stores were lost runs on from them (`run --restore`)."""

from __future__ import annotations

import re
from collections import Counter

import pandas as pd
import pytest
from helpers import TINY, cli, copy_of, one_line_error, run_args, runs, stores, trial_states
from scipy import stats

from mnist_study.analysis.publish import markers
from mnist_study.study.spec_file import load_spec

# The tiny study with a third variant, tuned 3 times each (1 trial + 2 seeds per tuning):
# the tuning is the unit.
REPLICATED = (
    TINY.replace("trials = 2", "trials = 1\ntunings = 3", 1).replace(
        "startup_trials = 2", "startup_trials = 1"
    )
    + """[variants.dropout]
search.lr = { low = 1e-3, high = 3e-3, log = true }
search.dropout = { low = 0.1, high = 0.5 }
"""
)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The study run to the end and published with --page: (folder, spec, page)."""
    root = tmp_path_factory.mktemp("raw")
    spec = root / "rep.toml"
    spec.write_text(REPLICATED)
    tracking, storage = stores(root)
    done = cli(*run_args(spec, tracking, storage))
    assert done.returncode == 0, done.stderr[-2000:]
    page = root / "docs" / "rep.md"
    args = ["--tracking-uri", tracking, "--storage", storage, "--out", str(root / "from-stores")]
    done = cli("report", str(spec), *args, "--page", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    return root, spec, page


def section(page_text: str) -> str:
    start, end = markers("rep")
    return page_text.split(start)[1].split(end)[0]


def tables(report: str) -> list[str]:
    """The report without what names its source: the provenance line (its command),
    figure links (their folder) and the raw-runs line."""
    return [
        line
        for line in report.splitlines()
        if line.strip() and not line.startswith(("Study `rep`", "![", "Raw runs:"))
    ]


def test_the_page_publishes_every_trial_and_final_seed(published):
    root, _, page = published
    runs = pd.read_csv(root / "docs" / "data" / "rep-runs.csv")
    curves = pd.read_csv(root / "docs" / "data" / "rep-curves.csv")
    assert len(runs) == 3 * 3 * (1 + 2) and set(runs.study) == {"rep"}
    finals = runs[runs.role == "final"]
    assert len(finals) == 18 and finals.test_acc.notna().all()
    assert runs[runs.role == "tune"].test_acc.isna().all()  # the test set is the finals' alone
    assert (runs.best_val_acc >= runs.val_acc).all() and (runs.seconds > 0).all()
    assert set(finals.groupby(["variant", "tuning"]).seed.apply(tuple)) == {(0, 1)}
    assert runs.lr.between(1e-3, 3e-3).all() and runs.commit.notna().all()
    # Each final seed trains with its tuning's point.
    assert (finals.groupby(["variant", "tuning"]).lr.nunique() == 1).all()
    assert set(curves.metric) >= {"train_acc", "val_acc"} and len(curves) % 18 == 0
    assert "data/rep-runs.csv" in section(page.read_text())


def test_report_from_the_csv_alone_equals_the_report_from_the_stores(published, tmp_path):
    root, spec, page = published
    (root / "mlflow.db").rename(tmp_path / "away.db")  # no store to fall back on
    try:
        done = cli(
            "report", str(spec), "--runs", str(root / "docs/data/rep-runs.csv"),
            "--out", str(tmp_path / "from-csv"),
        )  # fmt: skip
    finally:
        (tmp_path / "away.db").rename(root / "mlflow.db")
    assert done.returncode == 0, done.stderr[-2000:]
    from_csv = (tmp_path / "from-csv" / "rep" / "results.md").read_text()
    from_stores = (root / "from-stores" / "rep" / "results.md").read_text()
    assert tables(from_csv) == tables(from_stores)
    for part in ("| variant |", "Calibration at", "Plan at", "Resolved (", "| arm |"):
        assert part in from_csv
    assert "--runs" in from_csv and not (tmp_path / "away.db").exists()


def test_a_study_run_on_two_machines_names_each_cpu_with_its_runs(published, tmp_path):
    """Stores lost and restored on another machine, or resumed there: the provenance line
    names every CPU the runs ran on, not the most frequent one."""
    root, spec, _ = published
    runs = pd.read_csv(root / "docs/data/rep-runs.csv", dtype=str, keep_default_na=False)
    other = runs.tuning == "2"
    runs.loc[other, "cpu"] = "Other CPU x2 (family 9 model 9, AVX2 kernels)"
    (tmp_path / "data").mkdir()
    runs.to_csv(tmp_path / "data" / "rep-runs.csv", index=False)
    done = cli(
        "report", str(spec), "--runs", str(tmp_path / "data" / "rep-runs.csv"),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    body = (tmp_path / "out" / "rep" / "results.md").read_text()
    mine = runs.loc[~other, "cpu"].iat[0]
    assert f"{mine} ({(~other).sum()} runs), " in body
    assert f"Other CPU x2 (family 9 model 9, AVX2 kernels) ({other.sum()} runs)" in body


def test_welch_on_tuning_means_from_the_csv_gives_the_pages_numbers(published):
    root, _, page = published
    runs = pd.read_csv(root / "docs" / "data" / "rep-runs.csv")
    finals = runs[(runs.role == "final") & (runs.status == "FINISHED")]
    means = finals.groupby(["variant", "tuning"]).test_acc.mean()
    shown = section(page.read_text())
    for variant in ("batchnorm", "dropout"):
        result = stats.ttest_ind(means[variant], means["baseline"], equal_var=False)
        low, high = result.confidence_interval(0.95)
        delta = means[variant].mean() - means["baseline"].mean()
        row = re.search(rf"^\| {variant} \| ([^|]+) \| (\S+) \(Holm", shown, re.M)
        assert row, f"no comparison row for {variant}"
        assert row[1].strip() == f"{delta * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}]"
        assert row[2] == f"{result.pvalue:.2g}"
    # The gap column: train − validation accuracy of the final seeds, Welch on tuning
    # means, Holm over the two comparisons.
    gaps = (finals.train_acc - finals.val_acc).groupby([finals.variant, finals.tuning]).mean()
    p = {
        v: stats.ttest_ind(gaps[v], gaps["baseline"], equal_var=False).pvalue
        for v in ("batchnorm", "dropout")
    }
    first, second = sorted(p, key=p.get)
    holm = {first: min(1, 2 * p[first])}
    holm[second] = min(1, max(holm[first], p[second]))
    for variant in ("batchnorm", "dropout"):
        row = re.search(rf"^\| {variant} \|.* of \d+ \| (\S+) \(Holm (\S+)\) \|$", shown, re.M)
        assert row, f"no gap cell for {variant}"
        assert row[1] == f"{gaps[variant].mean():.2%}".rstrip("%")
        assert row[2] == f"{holm[variant]:.2g}"


@pytest.mark.parametrize(
    "text, needle",
    [
        (None, "no such file"),
        ("a,b\n1,2\n", "no column(s)"),
        ("study,variant\n", "no column(s)"),
    ],
)
def test_a_file_that_is_not_a_studys_raw_runs_is_refused_in_one_line(tmp_path, text, needle):
    spec = tmp_path / "rep.toml"
    spec.write_text(REPLICATED)
    csv = tmp_path / "rep-runs.csv"
    if text is not None:
        csv.write_text(text)
    done = cli("report", str(spec), "--runs", str(csv), "--out", str(tmp_path), process=False)
    one_line_error(done, str(csv), needle)
    assert not (tmp_path / "rep").exists()


def test_raw_runs_of_another_study_are_refused(published, tmp_path):
    root, spec, _ = published
    other = tmp_path / "other.toml"
    other.write_text(REPLICATED)
    csv = root / "docs" / "data" / "rep-runs.csv"
    done = cli("report", str(other), "--runs", str(csv), "--out", str(tmp_path), process=False)
    one_line_error(done, "holds the runs of ['rep'], not of study 'other'")


def test_plan_without_a_pilot_names_one_of_the_store_or_says_how_to_make_one(
    published, finished, tmp_path
):
    root, _, _ = published
    other = tmp_path / "other.toml"  # a study this store has no runs of
    other.write_text(TINY)
    tracking, _ = stores(root)
    done = cli("plan", str(other), "--tracking-uri", tracking, process=False)
    one_line_error(done, "study 'other' has no runs here", "several times: rep (--pilot NAME)")
    spec, tracking, _ = copy_of(finished, tmp_path)  # tuned once, alone in its store
    done = cli("plan", str(spec), "--tracking-uri", tracking, process=False)
    one_line_error(done, "study 'tiny' has no cell tuned twice", "set study.tunings = 2 in")


@pytest.fixture(scope="module")
def round2(published):
    """The study's page as published at round 2 of 3 (`report --tunings 2 --page`), its
    stores then lost: (spec, runs CSV of tunings 0 and 1)."""
    root, spec, _ = published
    tracking, storage = stores(root)
    page = root / "round2" / "rep.md"
    args = ["--tracking-uri", tracking, "--storage", storage, "--out", str(root / "r2")]
    done = cli("report", str(spec), *args, "--tunings", "2", "--page", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    return spec, root / "round2" / "data" / "rep-runs.csv"


def test_a_study_restored_from_its_published_rounds_runs_on_as_its_lost_stores_would(
    published, round2, tmp_path
):
    root, _, _ = published
    spec, csv = round2
    tracking, storage = stores(tmp_path)
    done = cli(*run_args(spec, tracking, storage, "--restore", str(csv)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 tunings (indices 0-1), 18 runs: 18 trial(s) written" in done.stdout
    assert "begins from its published runs: 18 of 27 units restored, 9 to run" in done.stdout
    shown = cli("status", str(spec), "--tracking-uri", tracking, "--storage", storage)
    assert f"restored from {csv} (sha256 " in shown.stdout, shown.stderr[-2000:]
    # Only the third tuning ran here: 3 cells x (1 trial + 2 seeds), each in both stores.
    _, found = runs(tracking, "rep")
    roles = Counter(r.data.tags["role"] for r in found)
    assert roles["tune"] == 3 and roles["final"] == 6 and roles["restored"] == 1
    assert {r.data.tags["tuning"] for r in found if r.data.tags["role"] == "final"} == {"2"}
    states = trial_states(storage, load_spec(spec))
    assert all(sum(c.values()) == (1 if ".final" not in n else 2) for n, c in states.items())
    # Its trials are the ones the stores it lost ran: same points, same accuracies.
    args = ["--tracking-uri", tracking, "--storage", storage, "--out", str(tmp_path / "out")]
    page = tmp_path / "docs" / "rep.md"
    done = cli("report", str(spec), *args, "--page", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "restored from" in section(page.read_text())
    keys = ["variant", "tuning", "role", "seed", "state"]
    measured = ["lr", "dropout", "val_acc", "train_acc", "test_acc"]
    lost = pd.read_csv(root / "docs/data/rep-runs.csv").sort_values(keys)
    here = pd.read_csv(tmp_path / "docs/data/rep-runs.csv").sort_values(keys)
    assert len(here) == len(lost) == 27
    pd.testing.assert_frame_equal(
        here[keys + measured].reset_index(drop=True), lost[keys + measured].reset_index(drop=True)
    )
    # Restored to round 2, the page reads as the page published then.
    done = cli("report", str(spec), *args, "--tunings", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    restored = (tmp_path / "out" / "rep" / "results.md").read_text()
    assert tables(restored) == tables((root / "r2" / "rep" / "results.md").read_text())
    # The same command again: nothing restored twice, nothing run again.
    done = cli(*run_args(spec, tracking, storage, "--restore", str(csv)))
    assert done.returncode == 0 and "0 trial(s) written" in done.stdout, done.stderr[-2000:]
    again = Counter(r.data.tags["role"] for r in runs(tracking, "rep")[1])
    assert {k: again[k] for k in roles} == roles


def test_restoring_into_stores_that_ran_those_tunings_is_refused(published, round2):
    root, _, _ = published
    spec, csv = round2
    tracking, storage = stores(root)
    before = len(runs(tracking, "rep")[1])
    done = cli(*run_args(spec, tracking, storage, "--restore", str(csv)))
    one_line_error(done, "already holds trials of baseline/t0 that this file did not restore")
    assert len(runs(tracking, "rep")[1]) == before


@pytest.mark.parametrize(
    "edit, needle",
    [
        (("tunings = 3", "tunings = 1"), "tuning 1 of baseline (train_size 300) is not one"),
        (("low = 1e-3, high = 3e-3", "low = 2.9e-3, high = 3e-3"), "outside"),
        (("epochs = 1", "epochs = 2"), "epochs '1', but"),
    ],
)
def test_restoring_runs_of_another_design_is_refused_before_any_store_is_written(
    round2, tmp_path, edit, needle
):
    spec, csv = round2
    other = tmp_path / "rep.toml"
    other.write_text(spec.read_text().replace(*edit, 1))
    tracking, storage = stores(tmp_path)
    done = cli(*run_args(other, tracking, storage, "--restore", str(csv)), process=False)
    one_line_error(done, str(csv), needle)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.journal").exists()


@pytest.mark.parametrize("column, command", [("val_acc", "report"), ("lr", "run")])
def test_a_value_that_is_not_a_number_is_refused_in_one_line(round2, tmp_path, column, command):
    spec, csv = round2
    edited = tmp_path / "rep-runs.csv"
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    table.loc[table.role == "tune", column] = "fast"
    edited.write_text(table.to_csv(index=False))
    tracking, storage = stores(tmp_path)
    args = (
        ["report", str(spec), "--runs", str(edited), "--out", str(tmp_path / "out")]
        if command == "report"
        else run_args(spec, tracking, storage, "--restore", str(edited))
    )
    done = cli(*args, process=False)
    one_line_error(done, str(edited), "fast")
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
