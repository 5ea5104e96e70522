"""What tuning luck and the tuning budget do to a study's comparisons: with several
tunings per cell, each variant against the baseline by a hierarchical bootstrap (the
interval with tunings resampled beside the one over seeds alone); and per cell the
expected best validation accuracy as a function of the number of trials."""

from __future__ import annotations

import math

import pandas as pd

from mnist_study.analysis.significance import TuningLuck, expected_best, tuning_luck

RISE = 0.001
"""A cell whose expected best validation accuracy still rises by this much (0.1 points)
over its last doubling of trials was not tuned to a plateau."""


def test_acc_groups(runs: pd.DataFrame, variant: str) -> list[list[float]]:
    """The variant's finished final runs' test accuracies, one list per tuning."""
    if runs.empty or "metrics.test_acc" not in runs:
        return []
    ok = runs[
        (runs["tags.variant"] == variant)
        & (runs["tags.role"] == "final")
        & (runs["status"] == "FINISHED")
        & runs["metrics.test_acc"].notna()
    ]
    return [list(g["metrics.test_acc"].astype(float)) for _, g in ok.groupby("tuning")]


def comparisons(runs: pd.DataFrame, variants: list[str]) -> dict[str, TuningLuck]:
    """Each variant with final runs against the baseline's, tunings and seeds resampled."""
    base = test_acc_groups(runs, "baseline")
    out = {}
    for v in variants:
        mine = test_acc_groups(runs, v)
        if v != "baseline" and mine and base:
            out[v] = tuning_luck(mine, base)
    return out


def luck_table(table: pd.DataFrame) -> str:
    """Per variant: Δ with its interval over tunings and seeds, the interval over seeds
    alone, P(variant beats baseline), the tunings that agree in sign, Holm's p."""
    lines = [
        "| variant | Δ test, points (95%: tunings + seeds) | ± seeds only | "
        "P(variant > baseline) | tunings same sign | p (Holm) |",
        "|---|---|---|---|---|---|",
    ]
    for r in table[table.variant != "baseline"].itertuples():
        if math.isnan(r.diff_vs_baseline):
            continue
        lines.append(
            f"| {r.variant} | {r.diff_vs_baseline * 100:+.2f} "
            f"[{r.diff_low * 100:+.2f}, {r.diff_high * 100:+.2f}] | "
            f"± {r.seed_ci95 * 100:.2f} | {r.p_better:.2f} | "
            f"{r.same_sign:.0f} of {r.tunings:.0f} | {r.p_diff:.2g} (Holm {r.p_holm:.2g}) |"
        )
    rest = table[(table.variant != "baseline") & table.diff_ci95.notna()]
    if not rest.empty:
        lines += [
            "",
            f"Mean half-width of the 95% intervals: {rest.diff_ci95.mean() * 100:.2f} points "
            f"with tuning luck, {rest.seed_ci95.mean() * 100:.2f} over seeds alone "
            f"({rest.diff_ci95.mean() / rest.seed_ci95.mean():.1f}x).",
        ]
    return "\n".join(lines)


LUCK_LEGEND = (
    "With several tunings per cell, Δ test and its 95% interval come from a hierarchical "
    "bootstrap (10,000 draws; each arm's tunings drawn with replacement, then seeds with "
    "replacement within each drawn tuning), p from the same draws, Holm-adjusted over the "
    "variants at each size (the smallest p 10,000 draws can give is 0.0002); '± seeds "
    "only' holds the tunings fixed. P(variant > baseline): "
    "the share of (variant run, baseline run) pairs the variant wins (ties half). With 3 "
    "tunings an arm's interval rests on 3 draws of tuning luck: read it as an estimate, "
    "not an exact coverage. Budget figures: the expected best validation accuracy of n "
    "trials (Dodge et al. 2019) over each tuning's finished trials, a pruned one at its "
    "last value, averaged over the tunings."
)


def budget_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell and tuning, the expected best validation accuracy of n = 1..N trials
    (Dodge et al. 2019), over its finished trials (a pruned trial's last value)."""
    if runs.empty:
        return pd.DataFrame(columns=["variant", "train_size", "tuning", "trials", "expected"])
    tune = runs[
        (runs["tags.role"] == "tune") & runs["tags.optuna_state"].isin(["COMPLETE", "PRUNED"])
    ]
    rows = []
    for (variant, size, tuning), g in tune.groupby(
        ["tags.variant", "train_size", "tuning"], dropna=False
    ):
        values = list(g["metrics.val_acc"].dropna().astype(float))
        rows += [
            (variant, size, tuning, n, expected_best(values, n)) for n in range(1, len(values) + 1)
        ]
    return pd.DataFrame(rows, columns=["variant", "train_size", "tuning", "trials", "expected"])


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
