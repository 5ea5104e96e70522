"""The comparison with the tuning as its unit, checked by simulation with known effects
and variance components; its calibration check and power; the expected best of n trials
checked against enumeration."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mnist_study.analysis.significance import compare, expected_best, holm, paired_tost, seeds_only
from mnist_study.analysis.variance import (
    Components,
    calibrate,
    components,
    detectable_effect,
    interim_looks,
)

SEED_SD = 0.3  # points, as at 300 training images
TABLES = 2000  # per setting: coverage known to about ±1 point (2 standard errors)


def draw_arm(rng, mean: float, tunings: int, seeds: int, tuning_sd: float) -> list[list[float]]:
    luck = rng.normal(0, tuning_sd, tunings)
    return [list(mean + u + rng.normal(0, SEED_SD, seeds)) for u in luck]


SETTINGS = [
    (tunings, ratio, base_ratio)
    for tunings in (3, 5)
    for ratio in (0, 1, 2, 4)
    for base_ratio in dict.fromkeys((ratio, ratio / 2))  # equal, then unequal per arm
]


@pytest.mark.parametrize(("tunings", "ratio", "base_ratio"), SETTINGS)
def test_compare_covers_the_true_effect_and_keeps_its_false_positive_rate(
    tunings, ratio, base_ratio
):
    """Tables of two arms, R tunings x 4 seeds, tuning sd = ratio x seed sd (the
    baseline's its own): the 95% interval covers the true Δ in 93-98% of tables, p < 0.01
    in at most 2% of null tables. The hierarchical bootstrap it replaces covered 82-87%
    here once tunings differed. One null table serves both: Welch's interval moves with
    the data, so its coverage is the same at every true Δ."""
    rng = np.random.default_rng([tunings, int(ratio * 10), int(base_ratio * 10)])
    covered = null_hits = 0
    for _ in range(TABLES):
        variant = draw_arm(rng, 92, tunings, 4, ratio * SEED_SD)
        found = compare(variant, draw_arm(rng, 92, tunings, 4, base_ratio * SEED_SD))
        covered += found.low <= 0 <= found.high
        null_hits += found.p < 0.01
    assert found.level == "tunings"
    assert 0.93 <= covered / TABLES <= 0.98, covered / TABLES
    assert null_hits / TABLES <= 0.02, null_hits / TABLES


@pytest.mark.parametrize("tunings", [3, 5])
def test_compare_detects_an_effect_of_five_standard_errors(tunings):
    """Power, stated: at Δ = 5 standard errors of the difference (tuning sd = 2 x seed
    sd), p < 0.05 in at least 75% of tables at R = 3 and 90% at R = 5 (Welch on tuning
    means has 4 and 8 df here; noncentral t gives 0.83 and 0.98)."""
    rng = np.random.default_rng(tunings)
    tuning_sd = 2 * SEED_SD
    se = math.sqrt(2 * (tuning_sd**2 + SEED_SD**2 / 4) / tunings)
    hits = 0
    for _ in range(TABLES):
        variant = draw_arm(rng, 92 + 5 * se, tunings, 4, tuning_sd)
        hits += compare(variant, draw_arm(rng, 92, tunings, 4, tuning_sd)).p < 0.05
    assert hits / TABLES >= {3: 0.75, 5: 0.90}[tunings], hits / TABLES


def test_one_tuning_per_arm_is_welch_over_the_seeds_and_says_so():
    variant, baseline = [[93.0, 93.4, 92.9, 93.2]], [[92.0, 92.5, 91.8, 92.2]]
    found = compare(variant, baseline)
    expected = stats.ttest_ind(variant[0], baseline[0], equal_var=False)
    low, high = expected.confidence_interval(0.95)
    assert found.level == "seeds"
    assert (found.p, found.low, found.high) == pytest.approx((expected.pvalue, low, high))
    assert found.delta == pytest.approx(statistics.mean(variant[0]) - statistics.mean(baseline[0]))


def test_tunings_that_differ_widen_the_interval_beyond_the_seeds_alone():
    base = [[92.0, 92.5, 91.8, 92.2], [91.5, 92.1, 91.7, 91.9], [92.4, 92.6, 92.1, 92.3]]
    variant = [[93.0, 93.3, 92.9, 93.1], [92.1, 92.4, 92.0, 92.2], [94.0, 93.8, 94.1, 93.9]]
    tuned, seeds = compare(variant, base), seeds_only(variant, base)
    means = [[statistics.mean(t) for t in arm] for arm in (variant, base)]
    expected = stats.ttest_ind(*means, equal_var=False)
    assert tuned.p == pytest.approx(expected.pvalue)
    assert tuned.half_width > 2 * seeds.half_width and seeds.level == "seeds"


def test_calibration_of_the_report_at_known_components():
    """The report's check simulates null tables at its fitted components: at tuning sd =
    2 x seed sd it finds coverage near 95% and p < 0.01 near 1%."""
    rng = np.random.default_rng(7)
    arms = [components(draw_arm(rng, 92, 5, 4, 2 * SEED_SD)) for _ in range(8)]
    found = calibrate(arms[0], arms[1:], tables=4000)
    assert 0.93 <= found.coverage <= 0.97 and found.p01 <= 0.02
    assert found.any_resolved <= 0.03  # Holm over 7 at 0.01


def test_reading_every_round_is_simulated_as_the_report_reads_it():
    """An interim read's warning: null tables of 8 tunings x 4 seeds per arm (8 arms,
    tuning sd = seed sd) drawn here and read after every round from 2 on with compare()
    and holm(), as the report reads them, show a resolved verdict at some round more
    often than at round 8 alone; interim_looks' rates, from the true components, agree
    with these counts within 3 standard errors."""
    rng = np.random.default_rng(5)
    tables, planned, ever, last = 400, 8, 0, 0
    for _ in range(tables):
        arms = [draw_arm(rng, 92, planned, 4, SEED_SD) for _ in range(8)]
        hits = [
            bool((holm(pd.Series([compare(a[:r], arms[0][:r]).p for a in arms[1:]])) < 0.01).any())
            for r in range(2, planned + 1)
        ]
        ever, last = ever + any(hits), last + hits[-1]
    truth = Components((4,) * planned, SEED_SD**2, SEED_SD**2 + SEED_SD**2 / 4)
    assert math.sqrt(truth.tuning_var) == pytest.approx(SEED_SD)
    simulated = interim_looks(truth, [truth] * 7, planned)
    assert simulated[0] > simulated[1] and ever > last
    for rate, count in zip(simulated, (ever, last), strict=True):
        se = math.sqrt(rate * (1 - rate) / 2000 + count / tables * (1 - count / tables) / tables)
        assert abs(rate - count / tables) <= 3 * max(se, 0.005), (rate, count / tables)
    assert simulated[1] <= 0.02  # one read, at round 8: the rule's own rate
    one_read = interim_looks(truth, [truth] * 7, 2)
    assert one_read[0] == one_read[1]


@pytest.mark.parametrize("scale", [1, 4])
def test_sizing_a_study_from_its_plan_at_an_interim_round_keeps_its_rates(scale):
    """The replication's own rule: plan 13 tunings, read the plan again at round 8 and
    raise the tunings to what it asks for 0.3 points (never lower). The plan reads only
    the variances, not Δ, so the final read keeps its rates: null tables of 8 arms x 4
    seeds, tuning sds unequal between the arms (the 1,000-image study's at 4 rounds,
    then 4x them), resized per table by plan.design from their first 8 rounds'
    components, each comparison priced from its own two arms: p < 0.01 in at most 2% of
    comparisons and a resolved table at most 2%, coverage 93-98%, and the rule does
    raise the tunings."""
    from mnist_study.analysis.plan import SizeFacts, design

    rng = np.random.default_rng(scale)
    tuning_sd = scale * np.array([0, 0.29, 0.14, 0.14, 0.08, 0, 0, 0])
    tables, most, covered, low_p, resolved, sizes = 500, 40, 0, 0, 0, []
    for _ in range(tables):
        luck = rng.standard_normal((8, most, 1)) * tuning_sd[:, None, None]
        arms = luck + rng.normal(0, SEED_SD, (8, most, 4))
        pilot = {f"arm{i}": components(arm[:8]) for i, arm in enumerate(arms)}
        tunings = max(13, design(SizeFacts(1000, 8, pilot, {}, {}), 0.3, 4, most)[0] or most)
        found = [compare(arm[:tunings], arms[0, :tunings]) for arm in arms[1:]]
        covered += sum(f.low <= 0 <= f.high for f in found)
        low_p += sum(f.p < 0.01 for f in found)
        resolved += bool((holm(pd.Series([f.p for f in found])) < 0.01).any())
        sizes.append(tunings)
    assert 0.93 <= covered / (7 * tables) <= 0.98, covered / (7 * tables)
    assert low_p / (7 * tables) <= 0.02 and resolved / tables <= 0.02, (low_p, resolved)
    assert max(sizes) > 13


def test_the_plan_prices_each_comparison_from_its_own_arms():
    """One arm with a seed at chance (the 1,000-image study's deeper at 7 rounds) makes
    its own comparison need more tunings than any design serves, and moves no other:
    the design is the most the others need, and the line says what it detects for the
    one it cannot serve."""
    from mnist_study.analysis.plan import MOST_TUNINGS, SizeFacts, design, effect_line

    rng = np.random.default_rng(7)
    arms = {v: draw_arm(rng, 95.7, 7, 4, SEED_SD / 2) for v in ("baseline", "a", "b")}
    healthy = {v: components(np.array(t) / 100) for v, t in arms.items()}
    arms["b"][5][3] = 11.35  # one seed of one tuning at chance
    broken = {v: components(np.array(t) / 100) for v, t in arms.items()}
    before, after = (design(SizeFacts(1000, 3, c, {}, {}), 0.003, 4) for c in (healthy, broken))
    assert before[1]["a"] == after[1]["a"] is not None
    assert after[1]["b"] is None and before[1]["b"] is not None
    assert after[0] == after[1]["a"] <= MOST_TUNINGS
    line = effect_line(SizeFacts(1000, 3, broken, {}, {}), 0.3, 4, 8, (2,), "here")
    assert f"b more than {MOST_TUNINGS}" in line and "the others detect: b " in line


def test_components_recover_the_seed_and_tuning_variance():
    rng = np.random.default_rng(3)
    arm = components(draw_arm(rng, 92, 400, 4, 2 * SEED_SD))
    assert math.sqrt(arm.seed_var) == pytest.approx(SEED_SD, rel=0.1)
    assert math.sqrt(arm.tuning_var) == pytest.approx(2 * SEED_SD, rel=0.15)


@pytest.mark.parametrize("base_ratio", [2, 0])
def test_detectable_effect_has_the_power_it_claims(base_ratio):
    """At the Δ it names, compare() reaches p < 0.01/7 in 75-85% of tables: arms alike,
    and an arm with tuning luck against one without (fewer Welch df)."""
    rng = np.random.default_rng(11)

    def mean_var(ratio):
        return (ratio * SEED_SD) ** 2 + SEED_SD**2 / 4

    effect = detectable_effect(mean_var(2), mean_var(base_ratio), 5, alpha=0.01 / 7)
    hits = sum(
        compare(
            draw_arm(rng, 92 + effect, 5, 4, 2 * SEED_SD),
            draw_arm(rng, 92, 5, 4, base_ratio * SEED_SD),
        ).p
        < 0.01 / 7
        for _ in range(TABLES)
    )
    assert 0.75 <= hits / TABLES <= 0.85, hits / TABLES
    more = detectable_effect(mean_var(2), mean_var(base_ratio), 10, 0.01 / 7)
    assert more < effect  # more tunings, smaller


def test_expected_best_of_n_trials_by_enumeration():
    values = [0.90, 0.95, 0.91, 0.97]
    for n in (1, 2, 3, 4):
        subsets = list(itertools.combinations(values, n))
        assert expected_best(values, n) == pytest.approx(statistics.mean(map(max, subsets)))
    assert expected_best(values, 4) == max(values)


def test_plan_wall_time_is_the_larger_of_spread_work_and_one_chain():
    from mnist_study.analysis.plan import SizeFacts, effect_line, smallest_design, wall_seconds

    arm = Components((4, 4), 0.003**2, 0.006**2 + 0.003**2 / 4)
    facts = SizeFacts(300, 2, {"a": arm, "b": arm}, {"a": 10.0, "b": 30.0}, {"a": 20.0, "b": 40.0})
    # Work: 3 tunings x (8 x 10 + 4 x 20) + 3 x (8 x 30 + 4 x 40) = 1,680 s; chain: 8 x 30 + 40.
    assert wall_seconds(facts, 3, 4, 8, 2) == pytest.approx(840)
    assert wall_seconds(facts, 3, 4, 8, 64) == pytest.approx(280)
    fewest = smallest_design(facts, "b", 0.01, 4)
    mean_var = arm.tuning_var + arm.seed_var / 4
    assert (
        detectable_effect(mean_var, mean_var, fewest, 0.01)
        <= 0.01
        < detectable_effect(mean_var, mean_var, fewest - 1, 0.01)
    )
    # The plan's answer carries what that design costs, runs and wall time per worker count.
    runs = 2 * fewest * (8 + 4)
    walls = [wall_seconds(facts, fewest, 4, 8, w) / 60 for w in (2, 64)]
    assert effect_line(facts, 1, 4, 8, (2, 64), "here") == (
        f"To detect 1 points at here with 4 seeds per tuning, tunings per cell by "
        f"comparison: b {fewest}. The most any comparison needs, up to 20: {fewest} tunings "
        f"per cell ({runs:,} runs; {walls[0]:.0f} min on 2 workers, {walls[1]:.0f} min on 64 "
        f"workers)."
    )
    assert effect_line(facts, 1e-6, 4, 8, (2,), "here").endswith(
        "No design of up to 20 tunings per cell serves any of them."
    )


def test_plan_seconds_per_run_leave_out_a_paused_run():
    """A cell's runs of one kind do the same work: a run held 20 minutes by a SIGSTOP
    does not move the plan's seconds; complete and pruned trials weigh by their counts."""
    from mnist_study.analysis.plan import seconds_per_run

    start = pd.Timestamp("2026-12-03 10:00", tz="UTC")
    rows = [("complete", 100), ("complete", 100), ("complete", 110), ("complete", 1300)]
    rows += [("pruned", 20), ("pruned", 20)]
    runs = pd.DataFrame(
        {
            "tags.role": "tune",
            "tags.variant": "a",
            "tags.outcome": [kind for kind, _ in rows] + ["complete"],
            "status": ["FINISHED"] * len(rows) + ["RUNNING"],
            "start_time": start,
            "end_time": [start + pd.Timedelta(seconds=s) for _, s in rows] + [pd.NaT],
        }
    )
    assert seconds_per_run(runs, "tune") == {"a": pytest.approx((4 * 105 + 2 * 20) / 6)}
    assert seconds_per_run(runs, "final") == {}


def test_holm_adjusts_for_several_comparisons():
    adjusted = holm(pd.Series([0.01, 0.04, math.nan, 0.03]))
    assert adjusted.tolist()[:2] == pytest.approx([0.03, 0.06])
    assert math.isnan(adjusted[2]) and adjusted[3] == pytest.approx(0.06)


def test_paired_tost_is_two_one_sided_t_tests():
    a = [0.9901, 0.9893, 0.9910, 0.9889, 0.9902, 0.9897]
    b = [0.9899, 0.9897, 0.9905, 0.9892, 0.9900, 0.9894]
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean, half, p = paired_tost(a, b, 0.001)
    lower = stats.ttest_1samp(d, -0.001, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, 0.001, alternative="less").pvalue
    assert p == pytest.approx(max(lower, upper)) and p < 0.05
    low, high = stats.ttest_1samp(d, 0).confidence_interval(0.90)
    assert (mean, half) == pytest.approx(((low + high) / 2, (high - low) / 2))
    assert paired_tost(a, b, 0.0001)[2] > 0.05  # a margin too tight to show
