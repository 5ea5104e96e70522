"""What tuning luck and the tuning budget do to a study's comparisons: with several
tunings per cell, each variant against the baseline with the tuning as the unit (beside
the interval over seeds alone), each arm's variance components and the calibration of
the intervals at them; and per cell the expected best validation accuracy as a function
of the number of trials."""

from __future__ import annotations

import math

import pandas as pd

from mnist_study.analysis.significance import expected_best
from mnist_study.analysis.tables import pct, points
from mnist_study.analysis.variance import (
    COVERAGE_FLOOR,
    TABLES,
    Components,
    calibrate,
    components,
    interim_looks,
    width_ratio_without_luck,
)
from mnist_study.tracking.names import Role

RISE = 0.001
"""A cell whose expected best validation accuracy still rises by this much (0.1 points)
over its last doubling of trials was not tuned to a plateau."""


def scored_finals(runs: pd.DataFrame, variant: str) -> pd.DataFrame:
    """The variant's finished final runs that logged a test accuracy."""
    if runs.empty or "metrics.test_acc" not in runs:
        return pd.DataFrame(columns=["tuning", "tags.seed", "metrics.test_acc"])
    return runs[
        (runs["tags.variant"] == variant)
        & (runs["tags.role"] == Role.FINAL)
        & (runs["status"] == "FINISHED")
        & runs["metrics.test_acc"].notna()
    ]


def test_acc_groups(runs: pd.DataFrame, variant: str) -> list[list[float]]:
    """The variant's finished final runs' test accuracies, one list per tuning."""
    ok = scored_finals(runs, variant)
    return [list(g["metrics.test_acc"].astype(float)) for _, g in ok.groupby("tuning")]


def comparison_table(table: pd.DataFrame) -> str:
    """Per variant: Δ with its interval (the tuning the unit), p and Holm's, the interval
    that ignores tunings beside it, how many tuning pairs agree in sign, and its train−val
    gap with the Holm p of its comparison (the same unit)."""
    base_gap = table.loc[table.variant == "baseline", "acc_gap_last"]
    base_gap = pct(base_gap.iloc[0]).rstrip("%") if len(base_gap) else "–"
    lines = [
        "| variant | Δ test, points [95%, Welch on tuning means] | p (Holm) | "
        "± seeds only (Welch over seeds, tunings ignored) | tuning pairs same sign | "
        f"train − val gap at the end, points (baseline {base_gap}; Holm p) |",
        "|---|---|---|---|---|---|",
    ]
    for r in table[table.variant != "baseline"].itertuples():
        if math.isnan(r.diff_vs_baseline):
            continue
        gap = pct(r.acc_gap_last).rstrip("%")
        gap += "" if math.isnan(r.gap_p_holm) else f" (Holm {r.gap_p_holm:.2g})"
        lines.append(
            f"| {r.variant} | {points(r.diff_vs_baseline)} "
            f"[{points(r.diff_low)}, {points(r.diff_high)}] | "
            f"{r.p_diff:.2g} (Holm {r.p_holm:.2g}) | ± {r.seed_ci95 * 100:.2f} | "
            f"{r.same_sign} of {r.tuning_pairs} | {gap} |"
        )
    return "\n".join(lines)


def components_table(arms: dict[str, Components]) -> str:
    lines = [
        "| arm | tunings | seeds per tuning | tuning sd, points | seed sd, points | "
        "tuning / seed sd | share of variance between tunings |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        tau, sigma = math.sqrt(a.tuning_var), math.sqrt(a.seed_var)
        share = a.tuning_var / (a.tuning_var + a.seed_var) if a.seed_var > 0 else math.nan
        lines.append(
            f"| {name} | {a.tunings} | {min(a.seeds)}–{max(a.seeds)} | {tau * 100:.2f} | "
            f"{sigma * 100:.2f} | {tau / sigma if sigma else math.nan:.2f} | {share:.0%} |"
        )
    return "\n".join(lines)


def tuning_section(
    runs: pd.DataFrame,
    table: pd.DataFrame,
    variants: list[str],
    where: str = "",
    rounds: tuple[int, int] | None = None,
) -> tuple[list[str], list[str]]:
    """With several tunings per cell: the comparisons, each arm's variance components,
    the calibration of the intervals at those components, and for an interim read (round
    K of N, `rounds`) what reading every round would do: (lines, checks)."""
    arms = {v: components(test_acc_groups(runs, v)) for v in variants}
    arms = {v: a for v, a in arms.items() if a.tunings >= 2}
    lines = [comparison_table(table), "", components_table(arms), ""]
    rest = table[(table.variant != "baseline") & table.diff_ci95.notna()]
    if "baseline" not in arms or len(arms) < 2 or rest.empty:
        return lines, []
    base, others = arms["baseline"], [a for v, a in arms.items() if v != "baseline"]
    observed = rest.diff_ci95.mean() / rest.seed_ci95.mean()
    lines += [
        f"Intervals with the tuning as the unit are {observed:.1f}x as wide as those over "
        f"seeds alone (mean half-width {rest.diff_ci95.mean() * 100:.2f} against "
        f"{rest.seed_ci95.mean() * 100:.2f} points); with no tuning luck at all this design "
        f"would give about {width_ratio_without_luck([base, *others]):.1f}x (simulated "
        "median): the excess, not the ratio, is the tuning luck.",
        "",
    ]
    cal = calibrate(base, others)
    lines.append(
        f"Calibration at this study's variances: coverage {cal.coverage:.1%} of the 95% "
        f"intervals, p < 0.01 in {cal.p01:.1%} of null comparisons, a resolved verdict in "
        f"{cal.any_resolved:.1%} of null tables ({cal.tables:,} tables simulated at Δ = 0 "
        "from the components above, analysed as this report is)."
    )
    if rounds:
        (k, n), (ever, last) = rounds, interim_looks(base, others, rounds[1])
        lines.append(
            f"An interim read: this is round {k} of {n}. Read after every round from 2 to "
            f"{n}, a null table would show a resolved verdict at some round in {ever:.1%} of "
            f"{TABLES:,} simulated, at round {n} alone in {last:.1%}: a verdict is round {n}'s."
        )
    found = []
    if cal.coverage < COVERAGE_FLOOR:
        found.append(
            f"{where}calibration: the 95% intervals cover {cal.coverage:.1%} of simulated "
            f"null tables (below {COVERAGE_FLOOR:.0%}); read the verdicts as weaker"
        )
    return lines + [""], found


LUCK_LEGEND = (
    "With several tunings per cell, the tuning is the unit of inference: Δ test, its 95% "
    "interval and p come from Welch's t on the tunings' mean test accuracies (each "
    "tuning weighs the same; in this balanced design the REML fit of accuracy ~ arm + "
    "(1 | tuning), each arm its own tuning variance, Satterthwaite df), Holm-adjusted "
    "over the variants at each size. Test acc: mean of the tuning means ± a t-interval "
    "over them. '± seeds only' treats every seed as independent and so leaves tuning "
    "luck out: it is shown for contrast, not for verdicts. Tuning pairs same sign: of "
    "the (variant tuning, baseline tuning) pairs, those whose means differ in Δ's "
    "direction. Variance components by method of moments (the tuning means' variance "
    "less seed variance / n, floored at 0). Budget figures: the expected best validation "
    "accuracy of n of a tuning's N trials drawn without replacement (equal to the "
    "observed best at n = N), a pruned trial at its last value capped at the tuning's "
    "worst complete one (it was stopped for being behind), averaged over the tunings."
)


def budget_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell and tuning, the expected best validation accuracy of n = 1..N trials
    drawn without replacement, over its finished trials (capped_values)."""
    if runs.empty:
        return pd.DataFrame(columns=["variant", "train_size", "tuning", "trials", "expected"])
    tune = runs[
        (runs["tags.role"] == Role.TUNE) & runs["tags.optuna_state"].isin(["COMPLETE", "PRUNED"])
    ]
    rows = []
    for (variant, size, tuning), g in tune.groupby(
        ["tags.variant", "train_size", "tuning"], dropna=False
    ):
        values = capped_values(g)
        rows += [
            (variant, size, tuning, n, expected_best(values, n)) for n in range(1, len(values) + 1)
        ]
    return pd.DataFrame(rows, columns=["variant", "train_size", "tuning", "trials", "expected"])


def capped_values(trials: pd.DataFrame) -> list[float]:
    """A tuning's trial values for its budget curve: complete trials at their value,
    pruned ones at their last value but no higher than the worst complete trial."""
    value = trials["metrics.val_acc"].astype(float)
    done = trials["tags.optuna_state"] == "COMPLETE"
    floor = value[done].min() if done.any() else math.inf
    capped = value.where(done, value.clip(upper=floor))
    return list(capped.dropna())


def mean_curve(mine: pd.DataFrame) -> pd.Series:
    """One cell's curve, the mean over its tunings, as far as every tuning reaches (a
    tuning still in progress has fewer trials)."""
    reach = mine.groupby("tuning").trials.max().min()
    return mine[mine.trials <= reach].groupby("trials").expected.mean()


def budget_checks(curves: pd.DataFrame, where: str = "") -> list[str]:
    """Cells whose curve (mean over tunings) still rises over its last doubling."""
    out = []
    for variant, mine in curves.groupby("variant", sort=False):
        mean = mean_curve(mine)
        last = int(mean.index.max())
        if last < 2:
            continue
        rise = mean[last] - mean[last // 2]
        if rise >= RISE:
            out.append(
                f"{where}{variant}: expected best validation accuracy still rises "
                f"{rise * 100:+.2f} points from {last // 2} to {last} trials; more trials "
                f"could change its tuning"
            )
    return out
