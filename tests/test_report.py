"""The report, checked against MLflow itself: rows, n, means, intervals, p-values,
figures, the README section (replaced in place, idempotent), partial studies."""

from __future__ import annotations

import math
import resource
import signal
import statistics

import pandas as pd
import pytest
from helpers import cli, copy_of, copy_stores, new_experiment, runs
from scipy import stats

from mnist_study.analysis.collect import collect
from mnist_study.analysis.publish import (
    busy_minutes,
    markers,
    peak_overlap,
    replace_section,
    seed_ranges,
    write_report,
)
from mnist_study.analysis.summary import summarize

MARK_START, MARK_END = markers("smoke")
README = f"# Title\n\nintro\n\n{MARK_START}\nold results\n{MARK_END}\n\n## After\n"


@pytest.fixture(scope="module")
def smoke_report(smoke_original, tmp_path_factory):
    spec, original = smoke_original
    out = tmp_path_factory.mktemp("report")
    tracking = f"sqlite:///{copy_stores(original, out / 'smoke')}/mlflow.db"
    readme = out / "README.md"
    readme.write_text(README)
    body = write_report(tracking, spec.name, out / "reports", readme)
    return spec, tracking, out, readme, body


def test_one_row_per_variant_with_values_recomputed_from_runs(smoke_report):
    spec, tracking, *_ = smoke_report
    table = summarize(collect(tracking, spec.name))
    assert list(table.variant) == [v.name for v in spec.variants]
    _, found = runs(tracking, spec.name)
    accs = {
        v.name: [
            r.data.metrics["accuracy/test"]
            for r in found
            if r.data.tags.get("variant") == v.name and r.data.tags["role"] == "final"
        ]
        for v in spec.variants
    }
    for row in table.itertuples():
        values = accs[row.variant]
        assert row.n == len(spec.settings.seeds) == len(values)
        assert row.test_acc_mean == pytest.approx(statistics.mean(values))
        half = (
            stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
        )
        mean = statistics.mean(values)
        assert (row.test_acc_low, row.test_acc_high) == pytest.approx(
            (max(0, mean - half), min(1, mean + half))
        )
        if row.variant != "baseline":  # one tuning per arm: Welch over the seeds
            assert row.level == "seeds" and 0 <= row.p_diff <= row.p_holm <= 1
            expected = stats.ttest_ind(values, accs["baseline"], equal_var=False).pvalue
            assert row.p_diff == pytest.approx(expected, nan_ok=True)
            interval = stats.ttest_ind(values, accs["baseline"], equal_var=False)
            low, high = interval.confidence_interval(0.95)
            assert row.diff_ci95 == pytest.approx((high - low) / 2)
            assert row.diff_vs_baseline == pytest.approx(
                statistics.mean(values) - statistics.mean(accs["baseline"])
            )
        assert row.trials_complete + row.trials_pruned == spec.settings.trials
        parent = next(
            r
            for r in found
            if r.data.tags["role"] == "variant" and r.data.tags["variant"] == row.variant
        )
        best = {k.removeprefix("best_"): [float(v)] for k, v in parent.data.params.items()}
        assert row.tuned_params == best  # read from the final runs, as the parent says
        assert row.best_val_point in range(1, spec.defaults.epochs + 1)
        assert row.acc_gap_last == pytest.approx(row.train_acc_last - row.val_acc_last)


def test_files_and_figures_written_and_logged(smoke_report):
    spec, tracking, out, _, body = smoke_report
    folder = out / "reports" / spec.name
    for name in (
        "results.md",
        "results.csv",
        "curves.png",
        "test_acc.png",
        "gap.png",
        "tuning.png",
    ):
        assert (folder / name).stat().st_size > 1000 or name.endswith((".md", ".csv"))
    assert len((folder / "results.csv").read_text().splitlines()) == len(spec.variants) + 1
    client, found = runs(tracking, spec.name)
    parent = next(r for r in found if r.data.tags["role"] == "variant")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {
        "report/curves.png",
        "report/test_acc.png",
        "report/gap.png",
        "report/tuning.png",
    }
    assert "| baseline |" in body and "train−val accuracy gap resolved (Holm p<0.01" in body


def test_readme_section_replaced_in_place_and_idempotent(smoke_report):
    spec, tracking, out, readme, body = smoke_report
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n" + MARK_START)
    assert text.endswith(MARK_END + "\n\n## After\n") and "old results" not in text
    assert body in text
    assert (out / "figures" / spec.name / "curves.png").exists()
    assert f"](figures/{spec.name}/curves.png)" in text
    write_report(tracking, spec.name, out / "reports", readme)
    assert readme.read_text() == text


def test_a_new_page_is_made_with_the_studys_markers(smoke_report):
    spec, tracking, out, _, _ = smoke_report
    page = out / "docs" / "smoke.md"
    page.parent.mkdir()
    body = write_report(tracking, spec.name, out / "reports", page)  # names the page's CSV
    assert page.read_text() == f"# Study `smoke`\n\n{MARK_START}\n{body}\n{MARK_END}\n"
    assert (out / "docs" / "figures" / spec.name / "curves.png").exists()


def test_empty_study_says_what_is_missing(tmp_path):
    """A study that recorded its spec and then ran nothing (stopped at once)."""
    from helpers import TINY
    from mlflow.tracking import MlflowClient

    from mnist_study.study.spec_file import parse_spec, spec_tag
    from mnist_study.tracking.names import SPEC_TAG

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = new_experiment(tracking, "empty")
    spec = spec_tag(parse_spec(TINY, tmp_path / "empty.toml"))
    MlflowClient(tracking).set_experiment_tag(experiment, SPEC_TAG, spec)
    body = write_report(tracking, "empty", tmp_path / "reports")
    assert "no runs" in body


def test_wall_time_leaves_out_pauses_between_resumes():
    t = pd.Timestamp("2026-01-01 10:00")
    minutes = [(0, 10), (5, 20), (60, 70), (90, None)]  # overlap, a pause, one unfinished
    starts = pd.Series([t + pd.Timedelta(minutes=a) for a, _ in minutes])
    ends = pd.Series([t + pd.Timedelta(minutes=b) if b else pd.NaT for _, b in minutes])
    assert busy_minutes(starts, ends) == pytest.approx(30)


def test_runs_at_once_counts_every_command_sharing_the_study():
    t = pd.Timestamp("2026-01-01 10:00")
    # three runs at once from minute 5 to 10 (a run that ends as another starts is not
    # two at once); an unfinished run counts as in progress
    minutes = [(0, 10), (0, 5), (5, 12), (5, 10), (10, 20), (30, None)]
    starts = pd.Series([t + pd.Timedelta(minutes=a) for a, _ in minutes])
    ends = pd.Series([t + pd.Timedelta(minutes=b) if b else pd.NaT for _, b in minutes])
    assert peak_overlap(starts, ends) == 3
    assert peak_overlap(starts[:2], ends[:2]) == 2


def test_runs_recorded_under_the_short_metric_names_still_read(tmp_path):
    from mlflow.tracking import MlflowClient

    from mnist_study.tracking.legacy import metric_history

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking)
    old = client.create_run(new_experiment(tracking, "old")).info.run_id
    client.log_metric(old, "val_acc", 0.9, step=1)
    new = client.create_run(new_experiment(tracking, "old")).info.run_id
    client.log_metric(new, "accuracy/validation", 0.8, step=1)
    assert [m.value for m in metric_history(tracking, old, "val_acc")] == [0.9]
    assert [m.value for m in metric_history(tracking, new, "val_acc")] == [0.8]


def test_seed_lists_read_as_ranges():
    assert seed_ranges((0, 1, 2, 3, 4)) == "0–4"
    assert seed_ranges(tuple(range(119, 99, -1))) == "100–119"
    assert seed_ranges((0, 1, 7, 9, 10, 11)) == "0, 1, 7, 9–11"


def test_the_report_is_one_run_inside_mlflow_linked_from_the_experiment(smoke_report):
    spec, tracking, out, readme, body = smoke_report
    write_report(tracking, spec.name, out / "reports", readme)  # a second time
    client, found = runs(tracking, spec.name)
    [report] = [r for r in found if r.data.tags["role"] == "report"]
    assert report.info.status == "FINISHED"
    assert report.data.tags["mlflow.note.content"] == body
    assert report.data.tags["mlflow.source.name"].startswith("mnist-study report smoke")
    logged = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"results.md", "results.csv", "curves.png", "test_acc.png"} <= logged
    experiment = client.get_experiment_by_name(spec.name)
    description = experiment.tags["mlflow.note.content"]
    link = (
        f"(#/experiments/{experiment.experiment_id}/runs/{report.info.run_id}"
        "?workflowType=machine_learning)"
    )
    assert description.count("Comparison (tables, verdicts, figures):") == 1 and link in description


def test_an_interval_is_clipped_to_what_accuracy_can_be():
    """Two seeds at 95.45% mean gave '95.45% ± 11.24', past 100%: clipped, as printed."""
    from mnist_study.intervals import acc_interval

    mean, low, high, level = acc_interval([[0.90, 0.999]])
    assert level == "seeds" and high == 1.0 and 0 < low < mean < high
    mean, low, high, level = acc_interval([[0.90, 0.91], [0.999, 0.998]])
    assert level == "tunings" and high == 1.0 and mean == pytest.approx((0.905 + 0.9985) / 2)


def test_a_page_is_left_as_it_was_by_a_study_not_finished_unless_partial(smoke_study, tmp_path):
    """One final run gone (deleted in the UI, or never run): `report --page` refuses in
    one line and writes nothing, not even reports/; `--partial` publishes, marked so."""
    spec, tracking, storage = smoke_study
    client, found = runs(tracking, spec.name)
    client.delete_run(next(r for r in found if r.data.tags["role"] == "final").info.run_id)
    planned = len(spec.cells) * (spec.settings.trials + len(spec.settings.seeds))
    start, end = markers(spec.name)
    page = tmp_path / "docs" / "smoke.md"
    page.parent.mkdir()
    page.write_text(f"# Mine\n\n{start}\nthe last complete table\n{end}\n\nhandwritten\n")
    before = page.read_bytes()
    out = tmp_path / "reports"
    args = ("report", spec.name, "--tracking-uri", tracking, "--storage", storage)
    args += ("--page", str(page), "--out", str(out))
    refused = cli(*args, process=False)
    assert refused.returncode == 2 and refused.stdout == ""
    [line] = refused.stderr.strip().splitlines()
    assert f"{page} left as it was" in line and f"{planned - 1} of its {planned} runs" in line
    assert "--partial" in line
    assert page.read_bytes() == before
    assert not out.exists() and not (page.parent / "figures").exists()
    published = cli(*args, "--partial", process=False)
    assert published.returncode == 0, published.stderr
    text = page.read_text()
    assert f"**Partial**: {planned - 1} of {planned} runs finished" in text
    assert "the last complete table" not in text and text.endswith("\n\nhandwritten\n")


def test_a_page_write_that_fails_part_way_leaves_the_page_as_it_was(tmp_path):
    """A disk that fills during the write (here a file-size limit of 4 KB): the error is
    raised, the old page is intact, and no temporary file is left beside it."""
    start, end = markers("s")
    page = tmp_path / "page.md"
    page.write_text(f"# P\n\n{start}\nold\n{end}\n\nhandwritten after the results\n")
    before = page.read_bytes()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
    try:
        with pytest.raises(OSError, match="File too large"):
            replace_section(page, "x" * 100_000, "s")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    assert page.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["page.md"]


def test_a_brief_report_prints_each_variants_accuracy_verdicts_and_checks_and_where_the_rest_is(
    finished, tmp_path
):
    spec, tracking, storage = copy_of(finished, tmp_path)
    args = ["report", str(spec), "--tracking-uri", tracking, "--storage", storage, "--brief"]
    done = cli(*args, "--out", str(tmp_path / "reports"), process=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["variant", "test", "acc", "[95%]"]
    assert [line.split()[0] for line in lines[1:3]] == ["baseline", "batchnorm"]
    assert max(len(line) for line in lines[:3]) <= 100  # fits a terminal
    assert "**Checks**" in done.stdout
    assert "![" not in done.stdout and "Command:" not in done.stdout
    assert done.stdout.rstrip().endswith("(the whole report: results.md)")
    assert (tmp_path / "reports" / "tiny" / "results.md").read_text().count("![") >= 1


def test_a_final_seed_that_ended_near_chance_is_named_in_the_checks(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    args = ["report", str(spec), "--tracking-uri", tracking, "--storage", storage, "--brief"]
    before = cli(*args, "--out", str(tmp_path / "before"), process=False)
    assert before.returncode == 0, before.stderr
    assert "near chance" not in before.stdout
    client, found = runs(tracking, "tiny")
    final = next(
        r for r in found if r.data.tags["role"] == "final" and r.data.tags["variant"] == "batchnorm"
    )
    # what a net whose training diverged scores: it always guesses MNIST's commonest digit
    client.log_metric(final.info.run_id, "accuracy/test", 0.1135, step=10**6)
    after = cli(*args, "--out", str(tmp_path / "after"), process=False)
    assert after.returncode == 0, after.stderr
    named = [line for line in after.stdout.splitlines() if "near chance" in line]
    seed, tuning = final.data.tags["seed"], final.data.tags.get("tuning", "0")
    assert len(named) == 1
    assert f"batchnorm: tuning {tuning}: 1 of" in named[0] and f"seed {seed} 11.35%" in named[0]


def test_runs_from_an_edited_checkout_are_counted_apart_in_the_header(finished, tmp_path):
    """A run tagged `<commit>-dirty` ran on an edit of that commit: the header names it
    apart from the clean commit's runs instead of cutting both to the same 12 digits."""
    spec, tracking, storage = copy_of(finished, tmp_path)
    client, found = runs(tracking, "tiny")
    children = [r for r in found if r.data.tags["role"] in ("tune", "final")]
    client.set_tag(children[0].info.run_id, "git_commit", "ab" * 20)
    client.set_tag(children[1].info.run_id, "git_commit", "ab" * 20 + "-dirty")
    body = write_report(tracking, "tiny", tmp_path / "reports", storage=storage)
    assert f"`{'ab' * 6}` (1 run)" in body and f"`{'ab' * 6}-dirty` (1 run)" in body


def test_a_difference_that_rounds_to_zero_is_shown_without_a_sign():
    """-0.00 would claim a direction the rounded number does not have."""
    from mnist_study.analysis.tables import points

    assert points(-0.00004) == points(0.00004) == points(0.0) == "0.00"
    assert (points(-0.0011), points(0.0011)) == ("-0.11", "+0.11")
