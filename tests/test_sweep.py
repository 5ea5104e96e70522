"""The training-set-size sweep end to end on a toy budget (2 sizes, real MNIST, real
stores in tmp dirs): one Optuna study per cell with the exact budget, final seeds per
cell, evaluation points per run, the per-size report recomputed from MLflow, a sweep
killed mid-way reported as partial, then resumed."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess

import optuna
import pytest
from helpers import REPO, assert_budget_met_exactly, command, runs, stores, trial_states

from mnist_study.analysis.collect import collect
from mnist_study.analysis.publish import markers, write_report
from mnist_study.analysis.summary import summarize, verdict
from mnist_study.analysis.sweep import at_size, val_loss_turn
from mnist_study.errors import ConfigError, SpecError
from mnist_study.study.optuna_storage import optuna_storage
from mnist_study.study.runner import RunOptions, run_study
from mnist_study.study.spec_file import load_spec, parse_spec
from mnist_study.study.stores import study_names

SWEEP = """
name = "sweep"
[study]
trials = 2
seeds = [0, 1]
startup_trials = 1
train_sizes = [200, 100]
[defaults]
steps = 30
evals = 10
batch_size = 16
val_size = 200
train_eval_size = 100
test_size = 500
threads = 1
[variants.baseline]
search.lr = { low = 1e-3, high = 3e-3, log = true }
[variants.dropout]
search.lr = { low = 1e-3, high = 3e-3, log = true }
search.dropout = { low = 0.1, high = 0.5 }
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mnist_root):
    tmp = tmp_path_factory.mktemp("sweep")
    path = tmp / "sweep.toml"
    path.write_text(SWEEP)
    spec = load_spec(path)
    tracking, storage = stores(tmp)
    run_study(spec, RunOptions(tracking, storage, str(mnist_root), log_models=False))
    return spec, tracking, storage, tmp


def test_cells_are_every_variant_at_every_size_smallest_first():
    spec = parse_spec(SWEEP, REPO / "sweep.toml")
    assert [c.key for c in spec.cells] == [
        "baseline.n100",
        "dropout.n100",
        "baseline.n200",
        "dropout.n200",
    ]
    assert spec.config_for(spec.cells[3], {"lr": 1e-3}).train_size == 200
    names = ("sweep.baseline.n100", "sweep.baseline.n100.final")
    assert study_names(spec, spec.tunings[0]) == names


@pytest.mark.parametrize(
    "change, needle",
    [
        ("train_sizes = [100, 100]", "distinct"),
        ("train_sizes = [59900]", "train_size = 59900; must be <= 59800"),
        ("train_sizes = []", "non-empty"),
    ],
)
def test_bad_sizes_are_refused(change, needle):
    text = SWEEP.replace("train_sizes = [200, 100]", change)
    with pytest.raises(ConfigError, match=needle):
        parse_spec(text, REPO / "sweep.toml")


def test_a_variant_may_not_fix_the_swept_size():
    text = (
        SWEEP
        + "[variants.big]\nset = { train_size = 500 }\nsearch.lr = { low = 1e-3, high = 2e-3 }\n"
    )
    with pytest.raises(SpecError, match="variants.big: sets train_size"):
        parse_spec(text, REPO / "sweep.toml")


def test_each_cell_has_its_own_studies_with_the_exact_budget(sweep):
    spec, tracking, storage, _ = sweep
    found = assert_budget_met_exactly(tracking, storage, spec)
    assert len(trial_states(storage, spec)) == 2 * len(spec.cells)
    for run in found:
        tags = run.data.tags
        size = int(tags["train_size"])
        assert size in spec.settings.train_sizes
        if tags["role"] == "variant":
            assert run.info.run_name == f"{tags['variant']}.n{size}" == tags["cell"]
            continue
        assert run.data.params["train_size"] == str(size)
        assert run.info.run_name.startswith(f"{tags['variant']}.n{size}/")
    # Nothing tuned at one size is reused at another: each final run names its own cell.
    finals = [r for r in found if r.data.tags["role"] == "final"]
    assert {r.data.tags["optuna_study"] for r in finals} == {
        f"sweep.{c.key}.final" for c in spec.cells
    }


def test_every_run_has_ten_points_on_the_optimizer_step_axis(sweep):
    spec, tracking, _, _ = sweep
    client, found = runs(tracking, spec.name)
    for run in found:
        if run.data.tags["role"] != "final":
            continue
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "accuracy/validation")]
        assert steps == [3 * k for k in range(1, 11)]
        seen = client.get_metric_history(run.info.run_id, "optimizer/steps")
        assert [m.value for m in seen] == steps


def test_report_rows_per_variant_and_size_recomputed_from_mlflow(sweep):
    spec, tracking, storage, tmp = sweep
    data = collect(tracking, spec.name, storage)
    _, found = runs(tracking, spec.name)
    for n in spec.settings.train_sizes:
        table = summarize(at_size(data, n))
        assert list(table.variant) == ["baseline", "dropout"]
        for row in table.itertuples():
            accs = [
                r.data.metrics["accuracy/test"]
                for r in found
                if r.data.tags["role"] == "final"
                and r.data.tags["variant"] == row.variant
                and r.data.tags["train_size"] == str(n)
            ]
            assert row.n == 2 and row.test_acc_mean == pytest.approx(statistics.mean(accs))
        step, low, last = val_loss_turn(at_size(data, n).curves)
        assert step in range(3, 31, 3) and last >= low
    readme = tmp / "README.md"
    start, end = markers("sweep")
    readme.write_text(f"# R\n\n{start}\nold\n{end}\n")
    body = write_report(tracking, spec.name, tmp / "reports", readme, storage)
    assert body.count("#### ") == 2 and "#### 100 training images" in body
    assert "Resolved (Holm p<0.01; over the seeds of one tuning" in body
    assert "Baseline validation loss" in body
    csv = (tmp / "reports" / "sweep" / "results.csv").read_text().splitlines()
    assert len(csv) == 1 + 2 * 2
    assert (tmp / "reports" / "sweep" / "learning_curve.png").stat().st_size > 10_000
    assert body in readme.read_text()


def test_the_verdict_has_one_rule_for_test_accuracy_and_gap():
    import pandas as pd

    nan = float("nan")
    table = pd.DataFrame(
        {
            "variant": ["baseline", "augmentation", "dropout", "sgd_momentum"],
            "diff_vs_baseline": [nan, 0.05, 0.004, -0.03],
            "diff_ci95": [nan, 0.01, 0.006, 0.01],
            "p_holm": [nan, 0.001, 0.4, 0.002],
            "acc_gap_last": [0.08, 0.05, 0.07, 0.09],
            "gap_p_holm": [nan, 0.005, 0.03, 0.2],  # dropout's 0.03 passes 0.05, not 0.01
            "level": ["tunings"] * 4,
        }
    )
    text = verdict(table)
    assert text.startswith("Resolved (Holm p<0.01; the tuning the unit)")
    assert "raise it: augmentation +5.00 ± 1.00" in text
    assert "lower it: sgd_momentum -3.00 ± 1.00" in text
    assert "dropout < 1.00" in text
    assert "shrunk by augmentation; widened by none" in text


@pytest.mark.slow
def test_a_sweep_killed_mid_way_is_reported_partial_then_resumes(tmp_path):
    """Killed with SIGKILL mid-sweep, then run again: every cell ends with its exact
    budget. Invariant between the stores: every FAIL trial that has an MLflow run has it
    KILLED, no run is left RUNNING, and a FAIL trial without a run (its worker died
    between claiming it and creating the run) is named in the report's checks."""
    path = tmp_path / "sweep.toml"
    # Units of a second or more, with few evaluations (their cost is not under test).
    path.write_text(SWEEP.replace("steps = 30", "steps = 40").replace("evals = 10", "evals = 2"))
    tracking, storage = stores(tmp_path)
    args = ["run", str(path), "--tracking-uri", tracking, "--storage", storage]
    cmd = command(*args)
    proc = subprocess.Popen(
        [*cmd, "--workers", "2", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    for line in proc.stdout:  # the second size has begun: kill everything at once
        if ".n200/" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    data = collect(tracking, "sweep", storage)
    partial = write_report(tracking, "sweep", tmp_path / "reports", storage=storage)
    assert "n=200: " in partial and ("tuning incomplete" in partial or "not started" in partial)
    assert not (data.runs["tags.role"] == "final").all()
    done = subprocess.run([*cmd, "--workers", "2", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    spec = load_spec(path)
    states = trial_states(storage, spec)
    for tuning in spec.tunings:  # the killed units are FAIL, and were redone
        tune, final = study_names(spec, tuning)
        assert states[tune]["COMPLETE"] + states[tune]["PRUNED"] == 2
        assert states[final]["COMPLETE"] == 2
    _, found = runs(tracking, "sweep")
    assert not [r for r in found if r.info.status == "RUNNING"]
    killed = {r.info.run_id for r in found if r.info.status == "KILLED"}
    opened = optuna_storage(storage).open()
    failed = [
        t
        for name in states
        for t in optuna.load_study(study_name=name, storage=opened).trials
        if t.state.name == "FAIL"
    ]
    assert len(failed) >= 1
    assert killed == {
        t.system_attrs["mlflow_run_id"] for t in failed if "mlflow_run_id" in t.system_attrs
    }
    runless = sum("mlflow_run_id" not in t.system_attrs for t in failed)
    body = write_report(tracking, "sweep", tmp_path / "reports", storage=storage)
    assert "incomplete" not in body and "not started" not in body
    assert (f"{runless} failed trial(s) have no MLflow run" in body) == (runless > 0)


def test_units_are_claimed_in_rounds_size_by_size(tmp_path):
    """Every cell's first tuning before any cell's second, the smaller size before the
    larger: a study stopped part way holds whole rounds of every variant."""
    from mnist_study.study.scheduler import claim_order

    spec = parse_spec(SWEEP.replace("startup_trials = 1", "tunings = 2"), tmp_path / "s.toml")
    order = [(t.cell.train_size, t.index, t.cell.name) for t in claim_order(spec)]
    assert order == [(n, r, v) for n in (100, 200) for r in (0, 1) for v in ("baseline", "dropout")]
