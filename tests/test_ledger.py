"""The ledger: one read of Optuna's record gives each tuning's trials by state, its
final seeds done, running and free, its best trial, and the study's progress."""

from __future__ import annotations

import statistics

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial
from scipy import stats

from mnist_study.study.cells import cell_outcome
from mnist_study.study.ledger import Ledger, TuningLedger
from mnist_study.study.spec_file import parse_spec
from mnist_study.study.stores import study_names

SPEC = """
[study]
trials = 3
seeds = [0, 1]
tunings = 2
[variants.baseline]
search.lr = { low = 1e-3, high = 3e-3, log = true }
[variants.batchnorm]
set = { batchnorm = true }
search.lr = { low = 1e-3, high = 3e-3, log = true }
"""
LR = {"lr": FloatDistribution(1e-3, 3e-3, log=True)}


def trial(state: TrialState, slot: int, value: float | None = None, **attrs):
    done = state in (TrialState.COMPLETE, TrialState.PRUNED)
    return create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"lr": 2e-3},
        distributions=LR,
        user_attrs={"slot": slot, **attrs},
        intermediate_values={1: value or 0.5} if done else {},
    )


def test_a_ledger_counts_each_tuning_from_the_stored_trials(tmp_path):
    spec = parse_spec(SPEC, tmp_path / "ledger.toml")
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    tune, final = {}, {}
    for tuning in spec.tunings:
        names = study_names(spec, tuning)
        tune[tuning.key], final[tuning.key] = (
            optuna.create_study(storage=storage, study_name=n, direction="maximize") for n in names
        )
    base0, base1, bn0, _ = spec.tunings
    # baseline t0: tuned (a tie at 0.9 goes to the earlier slot), seed 0 done, 1 running.
    for t in (
        trial(TrialState.COMPLETE, 0, 0.9),
        trial(TrialState.FAIL, 1),
        trial(TrialState.PRUNED, 1),
        trial(TrialState.COMPLETE, 2, 0.9),
    ):
        tune[base0.key].add_trial(t)
    final[base0.key].add_trial(trial(TrialState.COMPLETE, 0, 0.8, seed=0, test_acc=0.8))
    final[base0.key].add_trial(trial(TrialState.RUNNING, 0, seed=1))
    # baseline t1: one trial done, one running.
    tune[base1.key].add_trial(trial(TrialState.COMPLETE, 0, 0.7))
    tune[base1.key].add_trial(trial(TrialState.RUNNING, 1))
    # batchnorm t0: every trial pruned, so no best to seed: finished without seeds.
    for slot in range(3):
        tune[bn0.key].add_trial(trial(TrialState.PRUNED, slot))

    ledger = Ledger.read(spec, tune, final)
    first = ledger[base0]
    assert (first.count(TrialState.COMPLETE), first.count(TrialState.PRUNED)) == (2, 1)
    assert first.failed == 1 and first.best.user_attrs["slot"] == 0
    assert first.seeds_done == {0} and first.free_seeds == [] and first.units_left == (0, 0)
    assert first.units_done == 3 + 1 and not first.finished
    second = ledger[base1]
    assert second.units_left == (1, 2) and second.free_seeds == [0, 1] and second.best.value == 0.7
    assert ledger[bn0].finished and ledger[bn0].best is None and ledger[bn0].units_done == 3
    assert ledger.progress() == (4 + 1 + 3, 4 * (3 + 2))
    # No round finished (baseline t0 still runs a seed); round 1 holds t0 of both cells.
    assert ledger.rounds() == (0, 4 + 3, 2 * (3 + 2))
    assert ledger.failed == 1
    running = {(t.key, final) for t, final, _ in ledger.running()}
    assert running == {(base0.key, True), (base1.key, False)}
    assert ledger.busy_cells() == {"baseline"}
    cells = {c.key: c for c in spec.cells}
    assert not any(ledger.cell_finished(cells[name]) for name in ("baseline", "batchnorm"))
    # Read again after the running seed ends: the tuning is finished.
    seed1 = final[base0.key].trials[1]
    final[base0.key].tell(seed1.number, 0.85)
    after = Ledger.read(spec, tune, final)
    assert after[base0].finished and after.rounds() == (1, 1, 2 * (3 + 2))
    # A tuning whose studies are not created yet (an extension before its run) is empty.
    del tune[base1.key], final[base1.key]
    assert Ledger.read(spec, tune, final)[base1].units_done == 0


def test_a_finished_cells_outcome_is_its_tunings_best_points_and_seeds(tmp_path):
    spec = parse_spec(SPEC, tmp_path / "ledger.toml")
    base0, base1 = spec.tunings[:2]
    tunings = []
    for tuning, accs in ((base0, (0.90, 0.92)), (base1, (0.94, 0.96))):
        trials = (trial(TrialState.COMPLETE, 0, 0.8), trial(TrialState.COMPLETE, 1, 0.85))
        finals = tuple(
            trial(TrialState.COMPLETE, 0, 0.8, seed=seed, test_acc=acc)
            for seed, acc in zip((0, 1), accs, strict=True)
        )
        tunings.append(TuningLedger(tuning, trials, finals, 3, (0, 1)))
    tags, params, metrics = cell_outcome(tunings)
    assert tags == {"t0.best_trial": 1, "t0.final_seeds": "0,1", "t1.best_trial": 1,
                    "t1.final_seeds": "0,1"}  # fmt: skip
    assert params == {"t0.best_lr": 2e-3, "t1.best_lr": 2e-3}
    # The mean over the tunings' means, and a t-interval over those 2 means (91%, 95%),
    # in percent as MLflow's table shows them.
    half = stats.t.ppf(0.975, 1) * statistics.stdev([91, 95]) / 2**0.5
    assert metrics["test_acc_mean"] == pytest.approx(93, abs=1e-4)
    assert metrics["test_acc_low"] == pytest.approx(93 - half, abs=1e-4)
    assert metrics["n_final"] == 4 and metrics["best_val_acc"] == pytest.approx(85)
    assert cell_outcome([TuningLedger(base0, (), (), 3, (0, 1))])[2] == {}
