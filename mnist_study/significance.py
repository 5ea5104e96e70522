"""The statistics of a comparison over seeds: intervals, Welch's test, Holm's correction."""

from __future__ import annotations

import math
import statistics

import pandas as pd
from scipy import stats


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width NaN below 2 values."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, stats.t.ppf(0.975, len(values) - 1) * sem


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
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(stats.t.ppf(0.975, df) * math.sqrt(va + vb))


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
