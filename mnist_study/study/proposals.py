"""How a tuning's next trial is proposed, as a function of the tuning and its finished
trials alone: the k-th trial's TPE sampler is seeded from (the tuning's seed, k) and sees
only the trials before it, so neither workers, timing, crashes nor resumes change it."""

from __future__ import annotations

import hashlib

import optuna

from mnist_study.study.spec import Tuning, Variant


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


def distributions(cell: Variant) -> dict[str, optuna.distributions.BaseDistribution]:
    out = {}
    for key, r in cell.search.items():
        if r.integer:
            out[key] = optuna.distributions.IntDistribution(int(r.low), int(r.high), log=r.log)
        else:
            out[key] = optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
    return out
