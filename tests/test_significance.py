"""The interval that carries tuning luck, and the expected best of n trials, checked
against direct computations."""

from __future__ import annotations

import itertools
import statistics

import numpy as np
import pytest

from mnist_study.analysis.significance import expected_best, tuning_luck

BASE = [[0.920, 0.925, 0.918, 0.922], [0.915, 0.921, 0.917, 0.919], [0.924, 0.926, 0.921, 0.923]]


def test_tunings_that_differ_widen_the_interval_beyond_the_seeds_alone():
    variant = [
        [0.930, 0.933, 0.929, 0.931],
        [0.921, 0.924, 0.920, 0.922],
        [0.940, 0.938, 0.941, 0.939],
    ]
    luck = tuning_luck(variant, BASE)
    assert luck.half_width > 2 * luck.seed_half_width
    assert luck.low < luck.diff < luck.high and luck.seed_low < luck.diff < luck.seed_high
    assert luck.same_sign == 3 and luck.tunings == 3


def test_identical_tunings_give_the_seed_only_interval_exactly():
    seeds = [0.930, 0.933, 0.929, 0.931]
    base = [[0.920, 0.925, 0.918, 0.922]] * 3
    luck = tuning_luck([seeds] * 3, base)
    assert (luck.low, luck.high) == (luck.seed_low, luck.seed_high)
    assert luck.diff == pytest.approx(statistics.mean(seeds) - statistics.mean(base[0]))


def test_interval_p_and_p_better_match_a_direct_computation():
    variant = [[0.93, 0.91], [0.90, 0.92, 0.95], [0.94]]
    base = [[0.92, 0.91], [0.93, 0.90]]
    draws = 2000
    luck = tuning_luck(variant, base, draws=draws, seed=7)
    # The same draws, one at a time: tunings with replacement, then seeds within each.
    diffs = []
    rngs = [(np.random.default_rng([7, 0, k]), np.random.default_rng([7, 1, k])) for k in (0, 1)]
    picks = [
        r.integers(0, len(arm), (draws, len(arm)))
        for (r, _), arm in zip(rngs, (variant, base), strict=True)
    ]
    us = [
        r.random((draws, len(arm), max(map(len, arm))))
        for (_, r), arm in zip(rngs, (variant, base), strict=True)
    ]
    for b in range(draws):
        means = []
        for k, arm in enumerate((variant, base)):
            values = []
            for place in range(len(arm)):
                tuning = arm[picks[k][b, place]]
                values += [tuning[int(u * len(tuning))] for u in us[k][b, place, : len(tuning)]]
            means.append(statistics.mean(values))
        diffs.append(means[0] - means[1])
    assert luck.low == pytest.approx(np.quantile(diffs, 0.025), abs=1e-12)
    assert luck.high == pytest.approx(np.quantile(diffs, 0.975), abs=1e-12)
    tail = min(sum(d <= 1e-12 for d in diffs), sum(d >= -1e-12 for d in diffs))
    assert luck.p == pytest.approx(min(1, 2 * (tail + 1) / (draws + 1)))
    flat_v, flat_b = sum(variant, []), sum(base, [])
    wins = [(a > b) + 0.5 * (a == b) for a in flat_v for b in flat_b]
    assert luck.p_better == pytest.approx(statistics.mean(wins))
    assert luck.diff == pytest.approx(statistics.mean(flat_v) - statistics.mean(flat_b))
    assert luck.same_sign == 3  # tuning means 0.92, 0.923, 0.94 against 0.915


def test_expected_best_of_n_trials_by_enumeration():
    values = [0.90, 0.95, 0.91, 0.97]
    for n in (1, 2, 3):
        draws = list(itertools.product(values, repeat=n))
        assert expected_best(values, n) == pytest.approx(statistics.mean(map(max, draws)))
    assert expected_best(values, 1) == pytest.approx(statistics.mean(values))
