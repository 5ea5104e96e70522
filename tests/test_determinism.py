"""A study is a function of its spec: the same trials, points, values and test
accuracies with 1 worker, 3 workers, or 2 workers killed with SIGKILL and resumed; and
tuning replicates kept apart in both stores."""

from __future__ import annotations

import os
import signal
import subprocess

import optuna
import pytest
from helpers import REPO, assert_budget_met_exactly, cli, command, stores

from mnist_study.analysis.publish import write_report
from mnist_study.study.optuna_storage import optuna_storage
from mnist_study.study.runner import RunOptions, run_study
from mnist_study.study.scheduler import propose
from mnist_study.study.spec_file import load_spec, parse_spec
from mnist_study.study.stores import study_names

# 2 sizes x 2 variants x 2 tunings: 8 tunings of 2 trials (the second proposed by TPE
# from the first) and 2 seeds, 10 steps of 16 images a run.
SWEEP = """
name = "same"
[study]
trials = 2
seeds = [0, 1]
startup_trials = 1
tunings = 2
train_sizes = [200, 100]
[defaults]
steps = 10
evals = 2
batch_size = 16
val_size = 100
train_eval_size = 100
test_size = 200
threads = 1
[variants.baseline]
search.lr = { low = 1e-3, high = 3e-2, log = true }
[variants.sgd]
set = { optimizer = "sgd" }
search.lr = { low = 1e-2, high = 0.3, log = true }
search.momentum = { low = 0.5, high = 0.95 }
"""


def outcome(spec, storage: str) -> dict:
    """Per Optuna study: each finished trial's (slot, point, value, state), in slot
    order, or each final seed's test accuracy."""
    opened = optuna_storage(storage).open()
    out = {}
    for tuning in spec.tunings:
        tune, final = study_names(spec, tuning)
        trials = optuna.load_study(study_name=tune, storage=opened).trials
        out[tune] = sorted(
            (t.user_attrs["slot"], t.params, t.value, t.state.name)
            for t in trials
            if t.state.name != "FAIL"
        )
        finals = optuna.load_study(study_name=final, storage=opened).trials
        out[final] = {
            t.user_attrs["seed"]: t.user_attrs["test_acc"] for t in finals if t.state.name != "FAIL"
        }
    return out


def test_the_next_point_depends_on_finished_trials_only():
    spec = parse_spec(SWEEP, REPO / "same.toml")
    tuning = spec.tunings[0]
    study = optuna.create_study(direction="maximize")
    for lr, value in ((0.002, 0.5), (0.01, 0.7), (0.02, 0.6)):
        study.enqueue_trial({"lr": lr})
        study.optimize(lambda t, v=value: t.suggest_float("lr", 1e-3, 3e-2, log=True) + v, 1)
    done = study.trials
    again = propose(tuning, done, 1)
    assert propose(tuning, done, 1) == again
    # A failed trial between them changes nothing; another slot or tuning proposes anew.
    study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)})
    assert propose(tuning, [t for t in study.trials if t.state.name == "COMPLETE"], 1) == again
    assert propose(tuning, done[:2], 1) != again
    assert propose(spec.tunings[1], done, 1) != again


@pytest.mark.slow
def test_one_worker_three_workers_and_a_killed_resumed_run_agree_exactly(tmp_path, mnist_root):
    path = tmp_path / "same.toml"
    path.write_text(SWEEP)
    spec = load_spec(path)
    results = {}
    for workers in (1, 3):
        tracking, storage = stores(tmp_path / f"w{workers}")
        run_study(spec, RunOptions(tracking, storage, str(mnist_root), workers, log_models=False))
        found = assert_budget_met_exactly(tracking, storage, spec)
        results[workers] = outcome(spec, storage)
    # Its report: per size, the comparisons with tuning luck and the tuning budget.
    body = write_report(tracking, spec.name, tmp_path / "reports", storage=storage)
    assert body.count("| variant | Δ test, points [95%, Welch on tuning means] |") == 2
    assert body.count("| arm | tunings | seeds per tuning | tuning sd, points |") == 2
    assert body.count("Calibration at this study's variances: coverage ") == 2
    assert body.count("| tunings R | seeds n | runs | wall on ") == 2
    assert " of 4 |" in body  # tuning pairs: 2 variant tunings x 2 baseline tunings
    # The plan from this study, as `mnist-study plan` prints it.
    planned = cli(
        "plan", str(path), "--tracking-uri", tracking, "--worker-counts", "2,64", process=False
    )
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.count("wall on 2 workers | wall on 64 workers | Δ ") == 2
    assert "seeds per tuning, tunings per cell by comparison: " in planned.stdout
    first = cli("plan", str(path), "--tracking-uri", tracking, "--tunings", "1", process=False)
    assert first.returncode == 2 and "tuned twice" in first.stderr  # round 1: one tuning a cell
    assert (tmp_path / "reports" / "same" / "budget_n100.png").stat().st_size > 10_000
    # Tuning replicates: runs named and tagged by tuning, each with its own sampler seed.
    names = {r.info.run_name for r in found}
    assert {"baseline.n100/t0/trial-0", "baseline.n100/t1/trial-0"} <= names
    assert {"sgd.n200/t1/seed-1"} <= names
    seeds = {
        (r.data.tags["cell"], r.data.tags["tuning"], r.data.tags["sampler_seed"])
        for r in found
        if r.data.tags["role"] != "variant"
    }
    assert ("sgd.n100", "0", "0") in seeds and ("sgd.n100", "1", "1") in seeds
    assert {r.data.tags["threads"] for r in found if r.data.tags["role"] != "variant"} == {"1"}

    tracking, storage = stores(tmp_path / "killed")
    cmd = command(
        "run", str(path), "--tracking-uri", tracking, "--storage", storage, "--workers", "2",
        "--quiet",
    )  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        start_new_session=True,
    )  # fmt: skip
    started = 0
    for line in proc.stdout:  # kill everything mid-study, units in progress
        started += line.startswith("[w")
        if started == 15:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert started == 15
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    results["killed"] = outcome(spec, storage)

    assert results[1] == results[3] == results["killed"]
    some = results[1]["same.sgd.n100.t0"]
    assert len(some) == 2 and len({str(p) for _, p, _, _ in some}) == 2
    assert results[1]["same.sgd.n100.t0"] != results[1]["same.sgd.n100.t1"]


GROW = """
name = "grow"
[study]
trials = 2
seeds = [0]
startup_trials = 1
tunings = 2
[defaults]
steps = 5
evals = 1
batch_size = 16
train_size = 100
val_size = 100
train_eval_size = 100
test_size = 200
threads = 1
[variants.baseline]
search.lr = { low = 1e-3, high = 3e-2, log = true }
[variants.dropout]
search.lr = { low = 1e-3, high = 3e-2, log = true }
search.dropout = { low = 0.1, high = 0.5 }
"""


@pytest.mark.slow
def test_an_extended_study_is_the_larger_study_run_fresh(tmp_path, mnist_root):
    """Started with 2 tunings and seed 0, then raised to 3 tunings and seeds 0 and 1:
    it keeps every finished unit, runs only the new ones, and ends with the same trials,
    points, values and test accuracies as the larger spec run from scratch."""
    path = tmp_path / "grow.toml"
    path.write_text(GROW)
    small = load_spec(path)
    tracking, storage = stores(tmp_path / "grown")
    run_study(small, RunOptions(tracking, storage, str(mnist_root), log_models=False))
    first = outcome(small, storage)
    path.write_text(GROW.replace("tunings = 2", "tunings = 3").replace("[0]", "[0, 1]"))
    large = load_spec(path)
    run_study(large, RunOptions(tracking, storage, str(mnist_root), log_models=False))
    grown = outcome(large, storage)
    assert all(grown[name] == first[name] for name in first if not name.endswith(".final"))
    assert_budget_met_exactly(tracking, storage, large)
    fresh_tracking, fresh_storage = stores(tmp_path / "fresh")
    run_study(large, RunOptions(fresh_tracking, fresh_storage, str(mnist_root), log_models=False))
    assert grown == outcome(large, fresh_storage)
    body = write_report(tracking, "grow", tmp_path / "reports", storage=storage)
    assert "extended after it started: study.tunings 2 -> 3, study.seeds + [1]" in body
    # Its first 2 rounds read alone: an interim read, of the units of tunings 0 and 1 only.
    body = write_report(tracking, "grow", tmp_path / "early", storage=storage, tunings=2)
    runs_read = 2 * 2 * (2 + 2)  # variants x tunings x (trials + seeds)
    assert f"{runs_read} runs; read here: the first 2 of its 3 tunings per cell, an interim" in body
    assert "An interim read: this is round 2 of 3." in body
    assert (
        "Resolved so far (round 2 of 3, an interim read; Holm p<0.01; the tuning the unit)" in body
    )
