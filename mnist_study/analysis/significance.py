"""The statistics of a comparison: over seeds (Welch's test, Holm's correction),
with the tuning as the unit (compare), and of a tuning budget (expected best)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special, stats


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
class Comparison:
    """A variant against the baseline: the difference of means, its 95% interval and p."""

    delta: float
    """Variant - baseline: of the tunings' mean accuracies (each tuning weighs the same),
    or of the seeds' where an arm was tuned once."""
    low: float
    high: float
    """The 95% interval of `delta` (Welch)."""
    p: float
    """Two-sided p of delta = 0 (Welch)."""
    df: float
    """Welch-Satterthwaite degrees of freedom."""
    level: str
    """"tunings": the tuning is the unit (its luck counted); "seeds": one tuning per arm,
    so the interval is over seeds alone and leaves the luck of tuning out."""

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def welch_parts(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean difference, its standard error, Welch-Satterthwaite df) on the last axis."""
    nx, ny = x.shape[-1], y.shape[-1]
    vx, vy = x.var(-1, ddof=1) / nx, y.var(-1, ddof=1) / ny
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (vx + vy) ** 2 / (vx**2 / (nx - 1) + vy**2 / (ny - 1))
    return x.mean(-1) - y.mean(-1), np.sqrt(vx + vy), df


def welch(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Welch's t on the last axis of x and y (any leading axes: simulated tables):
    (mean difference, 95% low, 95% high, two-sided p, df). With no spread in either
    arm the difference is exact: the interval is a point and p is 0 or 1."""
    delta, se, df = welch_parts(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        # scipy.special's t functions: 60x faster than stats.t's, for simulated tables
        half = special.stdtrit(df, 0.975) * se
        p = 2 * special.stdtr(df, -np.abs(delta) / se)
    exact = se == 0
    half = np.where(exact, 0.0, half)
    p = np.where(exact, np.where(delta == 0, 1.0, 0.0), p)
    return delta, delta - half, delta + half, p, np.where(exact, np.inf, df)


def compare(variant, baseline) -> Comparison:
    """The variant against the baseline, each a sequence of tunings, each tuning a
    sequence of its final seeds' test accuracies (any unit; the result in the same).

    With at least two tunings in each arm the tuning is the unit of inference: Welch's t
    on the tunings' mean accuracies, which in a balanced design is the REML fit of
    accuracy ~ arm + (1 | tuning) with each arm's own tuning variance and Satterthwaite
    df. With one tuning in an arm, Welch over all seeds: its interval leaves out the luck
    of tuning (the level says so). Fewer than two values in an arm: NaN."""
    arms = [[np.asarray(t, float) for t in arm if len(t)] for arm in (variant, baseline)]
    if min(len(arm) for arm in arms) >= 2:
        values, level = [np.array([t.mean() for t in arm]) for arm in arms], "tunings"
    else:
        values = [np.concatenate(arm) if arm else np.array([]) for arm in arms]
        level = "seeds"
    if min(len(v) for v in values) < 2:
        nan = math.nan
        return Comparison(nan, nan, nan, nan, nan, level)
    delta, low, high, p, df = (float(v) for v in welch(values[0], values[1]))
    return Comparison(delta, low, high, p, df, level)


def seeds_only(variant, baseline) -> Comparison:
    """The same comparison with every seed a unit, tunings ignored: what an analysis
    that forgets tuning luck would print, shown beside compare() for contrast."""
    flat = [[[a for t in arm for a in t]] for arm in (variant, baseline)]
    return compare(*flat)


def same_sign_pairs(variant, baseline) -> tuple[int, int]:
    """(pairs of a variant tuning and a baseline tuning whose means differ in the sign of
    the overall difference, all pairs)."""
    mv = [statistics.mean(t) for t in variant if len(t)]
    mb = [statistics.mean(t) for t in baseline if len(t)]
    sign = np.sign(statistics.mean(mv) - statistics.mean(mb)) if mv and mb else 0
    agree = sum(np.sign(a - b) == sign != 0 for a in mv for b in mb)
    return int(agree), len(mv) * len(mb)


def expected_best(values: list[float], n: int) -> float:
    """The expected best of n of these N trials drawn without replacement: sum over the
    sorted values v_i of v_i C(i-1, n-1) / C(N, n). At n = N it is the observed best
    (Dodge et al. 2019 draw with replacement, which lies below it and bends the curve
    up at the end)."""
    v = np.sort(np.asarray(values, float))
    weights = np.array([math.comb(i - 1, n - 1) for i in range(1, len(v) + 1)], float)
    return float((v * weights).sum() / math.comb(len(v), n))
