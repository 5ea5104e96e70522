"""The 95% interval of an arm's test accuracy, the one every table, figure and MLflow
column shows: a t-interval over its tunings' means when tuned several times, else over
its seeds (then tuning luck is left out)."""

from __future__ import annotations

import math
import statistics

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


def acc_interval(tunings: list[list[float]]) -> tuple[float, float, float, str]:
    """(mean, low, high, level) of an arm's test accuracy: over its tunings' means (t with
    R - 1 df) when tuned several times, else over its seeds; clipped to [0, 1]."""
    means = [statistics.mean(t) for t in tunings if t]
    values, level = means, "tunings"
    if len(means) < 2:
        values, level = [a for t in tunings for a in t], "seeds"
    if not values:
        return math.nan, math.nan, math.nan, level
    mean, half = interval(values)
    return mean, max(0.0, mean - half), min(1.0, mean + half), level
