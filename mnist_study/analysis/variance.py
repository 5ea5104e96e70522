"""Where a study's spread comes from and what its intervals are worth: each arm's
variance components (between tunings, between seeds within a tuning), the calibration
of compare()'s intervals at those components (simulated null tables), and the smallest
effect a design of R tunings x n seeds detects (power)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

from mnist_study.analysis.significance import welch, welch_parts

TABLES = 2000
"""Null tables simulated per calibration check: coverage to about ±0.5 points."""
COVERAGE_FLOOR = 0.93
"""Below this empirical coverage of a nominal 95% interval, the report raises a check."""


@dataclass(frozen=True)
class Components:
    """One arm's spread, by method of moments on its tunings' means."""

    seeds: tuple[int, ...]
    """Final seeds finished in each tuning."""
    seed_var: float
    """Pooled variance between seeds within a tuning (NaN without two seeds anywhere)."""
    means_var: float
    """Variance of the tunings' means (NaN below two tunings)."""

    @property
    def tunings(self) -> int:
        return len(self.seeds)

    @property
    def tuning_var(self) -> float:
        """Between-tuning variance: the tuning means' spread less what seeds put in it,
        floored at 0."""
        if math.isnan(self.means_var):
            return math.nan
        seed_part = 0.0 if math.isnan(self.seed_var) else self.seed_var * mean_inverse(self.seeds)
        return max(0.0, self.means_var - seed_part)


def mean_inverse(seeds: tuple[int, ...]) -> float:
    """Mean of 1/n over the tunings: a tuning mean of n seeds carries seed_var / n."""
    return float(np.mean([1 / n for n in seeds]))


def components(tunings) -> Components:
    """An arm's components from its tunings (each a sequence of seed accuracies)."""
    groups = [np.asarray(t, float) for t in tunings if len(t)]
    dof = sum(len(g) - 1 for g in groups)
    within = sum(((g - g.mean()) ** 2).sum() for g in groups)
    means = np.array([g.mean() for g in groups])
    return Components(
        seeds=tuple(len(g) for g in groups),
        seed_var=within / dof if dof else math.nan,
        means_var=float(means.var(ddof=1)) if len(groups) >= 2 else math.nan,
    )


def pooled_seed_var(arms: list[Components]) -> float:
    weighted = [(sum(n - 1 for n in a.seeds), a.seed_var) for a in arms]
    dof = sum(d for d, v in weighted if not math.isnan(v))
    return sum(d * v for d, v in weighted if not math.isnan(v)) / dof if dof else math.nan


@dataclass(frozen=True)
class Calibration:
    tables: int
    coverage: float
    """Share of simulated comparisons whose 95% interval covers the true Δ = 0."""
    p01: float
    """Share of simulated comparisons with p < 0.01."""
    any_resolved: float
    """Share of simulated tables with at least one comparison at Holm p < 0.01."""


def simulated_means(
    rng: np.random.Generator,
    arm: Components,
    seed_var: float,
    tables: int,
    tunings: int | None = None,
) -> np.ndarray:
    """(tables x tunings) tuning means of an arm with no effect: each tuning's luck
    N(0, tuning_var), plus its n seeds' mean N(0, seed_var / n). With `tunings`, that
    many, each with as many seeds as the arm's first."""
    n = np.asarray(arm.seeds if tunings is None else (arm.seeds[0],) * tunings, float)
    sd = np.sqrt(arm.tuning_var + seed_var / n)
    return rng.standard_normal((tables, len(n))) * sd


def null_seed_var(arms: list[Components]) -> float:
    """The pooled seed variance simulated null tables draw with (0 without any)."""
    seed_var = pooled_seed_var(arms)
    return 0.0 if math.isnan(seed_var) else seed_var


def holm_resolves(p: np.ndarray) -> np.ndarray:
    """Per simulated table (a column of p, one row per comparison): whether Holm at 0.01
    resolves anything, which it does iff its first step does."""
    return p.min(axis=0) * len(p) < 0.01


def calibrate(
    baseline: Components, variants: list[Components], tables: int = TABLES, seed: int = 0
) -> Calibration:
    """Tables drawn at these components with every Δ = 0 (the baseline shared by all the
    comparisons of a table, as in the study), each analysed as compare() does: Welch on
    the tuning means, Holm over the table."""
    rng = np.random.default_rng(seed)
    seed_var = null_seed_var([baseline, *variants])
    base = simulated_means(rng, baseline, seed_var, tables)
    covered, p = [], []
    for arm in variants:
        _, low, high, p_arm, _ = welch(simulated_means(rng, arm, seed_var, tables), base)
        covered.append((low <= 0) & (high >= 0))
        p.append(p_arm)
    p = np.array(p)
    return Calibration(
        tables=tables,
        coverage=float(np.mean(covered)),
        p01=float(np.mean(p < 0.01)),
        any_resolved=float(np.mean(holm_resolves(p))),
    )


def interim_looks(
    baseline: Components, variants: list[Components], planned: int, tables: int = TABLES
) -> tuple[float, float]:
    """Null tables of `planned` tunings per arm (each with as many seeds as the arm's
    first), read after every round from 2 on as compare() and Holm do: the share of tables
    with a resolved verdict at some round, and at the last round alone."""
    rng = np.random.default_rng(0)
    seed_var = null_seed_var([baseline, *variants])
    base, *others = (
        simulated_means(rng, arm, seed_var, tables, planned) for arm in [baseline, *variants]
    )
    ever = np.zeros(tables, bool)
    for r in range(2, planned + 1):
        resolved = holm_resolves(np.array([welch(a[:, :r], base[:, :r])[3] for a in others]))
        ever |= resolved
    return float(ever.mean()), float(resolved.mean())


def detectable_effect(
    variant_var: float,
    baseline_var: float,
    tunings: int,
    alpha: float,
    power: float = 0.8,
    draws: int = 20_000,
) -> float:
    """The smallest true Δ that compare() (Welch's t on R tuning means per arm) detects at
    two-sided `alpha` with this power, each tuning mean of the variant of variance
    `variant_var` and of the baseline `baseline_var` (tuning variance + seed variance / n).
    By simulation, since Welch's df are estimated from the data: the equal-variance t's
    2R - 2 df overstate its power (0.71 for a claimed 0.80 at R = 5 and alpha = 0.01/7),
    and the more the arms' variances differ the fewer df it has."""
    total = variant_var + baseline_var
    if tunings < 2 or not total > 0:
        return math.nan
    share = round(variant_var / total, 2)  # df depend on it alone; rounded to share draws
    return math.sqrt(total / 2) * standard_effect(tunings, alpha, power, draws, share)


@functools.cache
def standard_effect(tunings: int, alpha: float, power: float, draws: int, share: float) -> float:
    """detectable_effect with the two arms' variances summing to 2, the variant's `share`
    of it (it scales with the sd of their mean). Δ moves neither a draw's standard error
    nor its df, so a draw detects Δ iff |d + Δ| > its critical distance: one pass of
    Welch, then the power curve costs nothing."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, draws, tunings))
    delta, se, df = welch_parts(x * math.sqrt(2 * share), y * math.sqrt(2 * (1 - share)))
    reach = special.stdtrit(df, 1 - alpha / 2) * se

    def short(shift: float) -> float:
        return float(np.mean(np.abs(delta + shift) > reach)) - power

    return float(optimize.brentq(short, 0.0, float(np.quantile(reach, 0.999)) + 10, xtol=1e-4))


def width_ratio_without_luck(arms: list[Components], tables: int = TABLES) -> float:
    """The median ratio of compare()'s interval to the seeds-only one in tables of this
    design (tunings and seeds per tuning of each arm) with no tuning luck at all: the
    ratio a study shows from the method alone, to read its observed ratio against."""
    rng = np.random.default_rng(1)
    base, *variants = arms
    ratios = []
    for arm in variants:
        sample = [rng.standard_normal((tables, a.tunings, min(a.seeds))) for a in (arm, base)]
        full = welch(sample[0].mean(-1), sample[1].mean(-1))
        flat = welch(*(x.reshape(tables, -1) for x in sample))
        ratios.append((full[2] - full[1]) / (flat[2] - flat[1]))
    return float(np.median(ratios))
