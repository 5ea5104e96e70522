"""The statistics of a comparison: over seeds (intervals, Welch's test, Holm's correction),
over tunings and seeds (a hierarchical bootstrap), and of a tuning budget (expected best)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width NaN below 2 values."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    if statistics.pvariance(values) == 0:
        return mean, 0.0
    low, high = stats.ttest_1samp(values, mean).confidence_interval(0.95)
    return mean, float(high - low) / 2


def welch_p(a: list[float], b: list[float]) -> float:
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return 1.0 if statistics.mean(a) == statistics.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def welch_half_width(a: list[float], b: list[float]) -> float:
    """Half-width of the 95% Welch interval of mean(a) - mean(b): the resolution of the
    comparison. A difference inside it cannot be told from zero with these seeds."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return 0.0
    low, high = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return float(high - low) / 2


def holm(ps: pd.Series) -> pd.Series:
    """Holm-Bonferroni adjusted p-values (NaNs left out): comparing every variant to the
    baseline is several tests at once, and one of them passing p<0.05 by luck is likely."""
    valid = ps.dropna().sort_values()
    m, running, out = len(valid), 0.0, pd.Series(math.nan, index=ps.index)
    for rank, (idx, p) in enumerate(valid.items()):
        running = max(running, min(1.0, (m - rank) * p))
        out[idx] = running
    return out


def paired_tost(a: list[float], b: list[float], margin: float) -> tuple[float, float, float]:
    """Two one-sided tests that mean(a - b), paired by position, lies within ±margin:
    (mean difference, half-width of its 90% interval, p). p < 0.05 means equivalent:
    the 90% interval lies inside the margin."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean, n = statistics.mean(d), len(d)
    se = statistics.stdev(d) / math.sqrt(n)
    if se == 0:
        return mean, 0.0, 0.0 if abs(mean) < margin else 1.0
    p_low = stats.t.sf((mean + margin) / se, n - 1)  # H0: difference <= -margin
    p_high = stats.t.cdf((mean - margin) / se, n - 1)  # H0: difference >= +margin
    return mean, float(stats.t.ppf(0.95, n - 1) * se), float(max(p_low, p_high))


@dataclass(frozen=True)
class TuningLuck:
    """A variant against the baseline when each arm was tuned several times."""

    diff: float
    """Difference of the arms' mean test accuracy (all seeds of all tunings)."""
    low: float
    high: float
    """95% interval of `diff`: tunings resampled, then seeds within each."""
    p: float
    """Two-sided bootstrap p of diff = 0, (k + 1) / (draws + 1) at least."""
    seed_low: float
    seed_high: float
    """The same interval with tunings held fixed: seeds resampled within each."""
    p_better: float
    """P(a run of the variant beats one of the baseline), over all pairs, ties half."""
    same_sign: int
    """Of the variant's tunings, how many differ from the baseline in diff's direction."""
    tunings: int

    @property
    def half_width(self) -> float:
        return max(self.high - self.diff, self.diff - self.low)

    @property
    def seed_half_width(self) -> float:
        return max(self.seed_high - self.diff, self.diff - self.seed_low)


def arm_means(groups: list[np.ndarray], picks: np.ndarray | None, u: np.ndarray) -> np.ndarray:
    """Each bootstrap draw's mean of one arm. `groups`: its tunings' seed values; `picks`
    (draws x tunings): which tuning fills each place, None for every tuning in place;
    `u` (draws x tunings x most seeds): uniforms that pick the seeds within each place,
    shared by both ways so that identical tunings give identical draws."""
    total, count = np.zeros(len(u)), np.zeros(len(u))
    everyone = np.arange(len(u))
    for place in range(len(groups)):
        if picks is None:
            fills = [(everyone, groups[place])]
        else:
            fills = [(np.flatnonzero(picks[:, place] == j), g) for j, g in enumerate(groups)]
        for rows, values in fills:
            chosen = values[(u[rows, place, : len(values)] * len(values)).astype(int)]
            total[rows] += chosen.sum(axis=1)
            count[rows] += len(values)
    return total / count


def tuning_luck(
    variant: list[list[float]], baseline: list[list[float]], draws: int = 10_000, seed: int = 0
) -> TuningLuck:
    """Hierarchical bootstrap of the difference of means (variant - baseline): in each
    draw, each arm's tunings are drawn with replacement, then seeds with replacement
    within each drawn tuning. Bouthillier et al. (MLSys 2021): tuning adds about as much
    variance as initialization, and an interval over seeds alone is too narrow."""
    arms = [[np.asarray(g, float) for g in arm if len(g)] for arm in (variant, baseline)]
    means, seed_means = [], []
    for k, groups in enumerate(arms):
        widest = max(len(g) for g in groups)
        picks = np.random.default_rng([seed, 0, k]).integers(0, len(groups), (draws, len(groups)))
        u = np.random.default_rng([seed, 1, k]).random((draws, len(groups), widest))
        means.append(arm_means(groups, picks, u))
        seed_means.append(arm_means(groups, None, u))
    flat = [np.concatenate(groups) for groups in arms]
    diff = float(flat[0].mean() - flat[1].mean())
    d, ds = means[0] - means[1], seed_means[0] - seed_means[1]
    # Sums in another order differ in the last bits: a difference that small is a tie.
    below, above = int((d <= 1e-12).sum()), int((d >= -1e-12).sum())
    pairs = flat[0][:, None] - flat[1][None, :]
    sign = np.sign(diff)
    return TuningLuck(
        diff=diff,
        low=float(np.quantile(d, 0.025)),
        high=float(np.quantile(d, 0.975)),
        p=min(1.0, 2 * (min(below, above) + 1) / (draws + 1)),
        seed_low=float(np.quantile(ds, 0.025)),
        seed_high=float(np.quantile(ds, 0.975)),
        p_better=float((pairs > 0).mean() + 0.5 * (pairs == 0).mean()),
        same_sign=int(sum(np.sign(g.mean() - flat[1].mean()) == sign for g in arms[0])),
        tunings=len(arms[0]),
    )


def expected_best(values: list[float], n: int) -> float:
    """Dodge et al. (EMNLP 2019): the expected best of n trials drawn with replacement
    from these N: sum over the sorted values v_i of v_i ((i/N)^n - ((i-1)/N)^n)."""
    v = np.sort(np.asarray(values, float))
    i = np.arange(1, len(v) + 1) / len(v)
    return float((v * (i**n - (i - 1 / len(v)) ** n)).sum())
