"""Which unit of a study comes next, claimed as an Optuna trial (under the claim lock, which
the worker holds): in rounds (claim_order), a tuning's trials one at a time, then its
final seeds; and the point each trial tries.

Determinism: within a tuning, trials run one after another, each proposed from the
tuning's earlier trials alone (propose: the k-th trial's TPE sampler is seeded from the
tuning's seed and k, and sees only the trials before it), and the pruner compares it
with those alone; a trial redone after a crash proposes the same point. Workers run other tunings
meanwhile. So every proposal and metric follows from the spec, whatever the number of
workers or their timing.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import optuna

from mnist_study.study.ledger import Ledger
from mnist_study.study.liveness import claim_trial, waiting_line
from mnist_study.study.spec import Cell, StudySpec, Tuning
from mnist_study.study.stores import StudyStores
from mnist_study.tracking.names import Role
from mnist_study.training.config import TrainConfig


@dataclass(frozen=True)
class Unit:
    """One claimed piece of work: a tuning trial, or the final run of one seed."""

    study: optuna.Study
    tuning: Tuning  # its cell (the variant, at one size in a sweep) and which tuning
    role: Role  # TUNE or FINAL
    trial: optuna.Trial
    slot: int | None = None  # a tuning trial's place in its tuning: 0, 1, ...
    seed: int | None = None

    @property
    def cell(self) -> Cell:
        return self.tuning.cell


class Idle(enum.Enum):
    WAIT = "others still run units that the next one depends on"
    DONE = "nothing left to do"


class Scheduler:
    """What one worker claims from the study's Optuna studies."""

    def __init__(self, spec: StudySpec, stores: StudyStores, index: int):
        self.spec, self.stores, self.index = spec, stores, index
        self.waiting_on: list[str] = []  # what the last WAIT waits on, from other hosts

    def claim(self, ledger: Ledger) -> Unit | Idle:
        """The next unit, claimed as an Optuna trial of this process, from the study's
        state as read under the claim lock (`ledger`); or WAIT, or DONE."""
        waiting, self.waiting_on = False, []
        for tuning in claim_order(self.spec):
            state = ledger[tuning]
            if state.running_trials:  # trials of a tuning run one at a time
                waiting = True
                study = self.stores.tune[tuning.key]
                lines = (waiting_line(study.study_name, t) for t in state.running_trials)
                self.waiting_on += [line for line in lines if line]
                continue
            if len(state.done_trials) < self.spec.settings.trials:
                return self.claim_trial(tuning, state.done_trials)
            if state.free_seeds and state.best is not None:
                seed, final = state.free_seeds[0], self.stores.final[tuning.key]
                trial = claim_trial(final, {"worker": self.index})
                trial.set_user_attr("seed", seed)
                return Unit(final, tuning, Role.FINAL, trial, seed=seed)
            if state.running_finals:
                waiting = True
        return Idle.WAIT if waiting else Idle.DONE

    def claim_trial(self, tuning: Tuning, done: list) -> Unit:
        study, slot = self.stores.tune[tuning.key], len(done)
        study.sampler = FixedPoint(propose(tuning, done, self.spec.settings.startup_trials))
        trial = claim_trial(
            study,
            {"sampler_seed": tuning.sampler_seed, "worker": self.index},
            distributions(tuning.cell),
        )
        trial.set_user_attr("slot", slot)
        return Unit(study, tuning, Role.TUNE, trial, slot=slot)


def claim_order(spec: StudySpec) -> list[Tuning]:
    """Size by size (in the spec's order), in rounds: every cell's first tuning, then
    every cell's second, ... A study stopped part way then holds whole rounds, each a
    complete smaller study of every variant, and one extended by more tunings adds rounds."""
    size = {n: i for i, n in enumerate(spec.settings.train_sizes)}
    return sorted(spec.tunings, key=lambda t: (size.get(t.cell.train_size, 0), t.index))


def proposal_seed(tuning: Tuning, slot: int) -> int:
    """The sampler seed of one trial: a function of the tuning's seed and the trial's
    place. Not of the cell: every variant's k-th random startup trial then tries the
    same learning rate (common random numbers make the comparisons sharper)."""
    text = f"{tuning.sampler_seed}/{slot}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def propose(tuning: Tuning, done: list, startup_trials: int) -> dict[str, float | int]:
    """The point of the tuning's next trial, from its finished trials alone (copied into
    a study in memory, numbered 0, 1, ... whatever failed between them)."""
    sampler = optuna.samplers.TPESampler(
        seed=proposal_seed(tuning, len(done)), n_startup_trials=startup_trials
    )
    scratch = optuna.create_study(direction="maximize", sampler=sampler)
    scratch.add_trials(done)
    return scratch.ask(distributions(tuning.cell)).params


class FixedPoint(optuna.samplers.BaseSampler):
    """Gives the trial the point `propose` chose: the study's own sampler would see all
    its trials, failed and running ones too."""

    def __init__(self, params: dict[str, float | int]):
        self.params = params

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.params[param_name]


def distributions(cell: Cell) -> dict[str, optuna.distributions.BaseDistribution]:
    out = {}
    for key, r in cell.search.items():
        if TrainConfig.model_fields[key].annotation is int:
            out[key] = optuna.distributions.IntDistribution(int(r.low), int(r.high), log=r.log)
        else:
            out[key] = optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
    return out
