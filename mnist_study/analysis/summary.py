"""The summary of a study: one row per variant, checks and the verdict (publish.py writes
the report around them).

One row per variant: tuned hyperparameters, test accuracy with its 95% interval, the
difference from the baseline by compare() (the tuning as the unit where each cell was
tuned several times, else Welch over seeds), the generalization gap at the last and at
the best-validation point, trial outcomes and time. Plus the tuning
playbook's sanity checks, and the verdict rule: resolved at Holm-adjusted p < ALPHA.
"""

from __future__ import annotations

import math
import re
import statistics

import pandas as pd

from mnist_study.analysis.collect import StudyData
from mnist_study.analysis.luck import scored_finals, test_acc_groups
from mnist_study.analysis.significance import (
    compare,
    holm,
    same_sign_pairs,
    seeds_only,
)
from mnist_study.analysis.tables import points
from mnist_study.intervals import acc_interval
from mnist_study.tracking.names import Role

ALPHA = 0.01
"""Holm-adjusted p below which a comparison counts as resolved: the one verdict rule of
every report (test accuracy and gap alike)."""

CHANCE = 0.10
"""Test accuracy of guessing among MNIST's 10 classes; a final seed within DIVERGED of it
learned nothing (its training diverged), which a mean and its interval do not show."""
DIVERGED = 0.10


def per_seed_gaps(curves: pd.DataFrame, variant: str, point: int | None) -> dict[str, list]:
    """Per final seed at evaluation `point` (None: the last): accs, losses and the two gaps."""
    mine = curves[curves.variant == variant]
    if mine.empty:
        return {}
    wide = mine.pivot_table(index=["tuning", "seed", "point"], columns="metric", values="value")
    point = point or int(mine.point.max())
    at = wide.xs(point, level="point")
    return {
        "train_acc": list(at.train_acc),
        "val_acc": list(at.val_acc),
        "acc_gap": list(at.train_acc - at.val_acc),
        "loss_gap": list(at.val_loss - at.train_loss),
    }


def gap_groups(curves: pd.DataFrame, variant: str) -> list[list[float]]:
    """The final seeds' train − validation accuracy gaps at the last point, one list per
    tuning: the unit compare() takes, as for test accuracy."""
    mine = curves[(curves.variant == variant) & curves.metric.isin(["train_acc", "val_acc"])]
    if mine.empty:
        return []
    last = mine[mine.point == mine.point.max()]
    wide = last.pivot_table(index=["tuning", "seed"], columns="metric", values="value")
    gaps = wide.train_acc - wide.val_acc
    return [list(g) for _, g in gaps.groupby(level="tuning")]


def best_val_point(curves: pd.DataFrame, variant: str) -> int | None:
    mine = curves[(curves.variant == variant) & (curves.metric == "val_acc")]
    if mine.empty:
        return None
    return int(mine.groupby("point").value.mean().idxmax())


def replicated(data: StudyData) -> bool:
    """Whether the study tuned each cell more than once."""
    if data.spec is not None:
        return data.spec.settings.tunings > 1
    return not data.runs.empty and data.runs["tuning"].nunique() > 1


def summarize(data: StudyData) -> pd.DataFrame:
    """One row per variant: its test accuracy and its difference from the baseline by
    compare() (the tuning the unit where the study tuned each cell several times), the
    gaps, its trials and time; p-values Holm-adjusted over the variants."""
    base = test_acc_groups(data.runs, "baseline")
    base_gaps = gap_groups(data.curves, "baseline")
    table = pd.DataFrame([variant_row(data, variant, base, base_gaps) for variant in data.variants])
    table["p_holm"] = holm(table.p_diff)
    table["gap_p_holm"] = holm(table.gap_p)
    return table


def variant_row(data: StudyData, variant: str, base: list, base_gaps: list) -> dict:
    """A variant's row, its comparison with the baseline by compare()."""
    runs = data.runs
    mine = runs[runs["tags.variant"] == variant] if not runs.empty else runs
    parent = mine[mine["tags.role"] == Role.VARIANT] if not mine.empty else mine
    tune = mine[mine["tags.role"] == Role.TUNE] if not mine.empty else mine
    groups = test_acc_groups(runs, variant)
    mean, low, high, level = acc_interval(groups)
    last = per_seed_gaps(data.curves, variant, None)
    best_point = best_val_point(data.curves, variant)
    best = per_seed_gaps(data.curves, variant, best_point) if best_point else {}
    states = tune["tags.optuna_state"].value_counts() if not tune.empty else {}
    variant_spec = (
        next((v for v in data.spec.variants if v.name == variant), None) if data.spec else None
    )
    finals = mine[mine["tags.role"] == Role.FINAL] if not mine.empty else mine
    tuned = tuned_from_finals(finals, variant_spec.search) if variant_spec else tuned_points(parent)
    other = variant != "baseline" and groups and base
    found = compare(groups, base) if other else None
    seeds = seeds_only(groups, base) if other else None
    agree, pairs = same_sign_pairs(groups, base) if other else (0, 0)
    nan = math.nan
    return {
        "variant": variant,
        "change": description(data, variant),
        "tuned": ", ".join(
            f"{k}=" + " / ".join(f"{x:.3g}" for x in tuned[k])
            for k in sorted(tuned, key=lambda k: (k != "lr", k))
        ),
        "test_acc_mean": mean,
        "test_acc_low": low,
        "test_acc_high": high,
        "test_acc_level": level,
        "n": sum(len(g) for g in groups),
        "tunings": len(groups),
        "diff_vs_baseline": found.delta if found else nan,
        "diff_low": found.low if found else nan,
        "diff_high": found.high if found else nan,
        "diff_ci95": found.half_width if found else nan,
        "p_diff": found.p if found else nan,
        "level": found.level if found else level,
        "seed_ci95": seeds.half_width if seeds else nan,
        "same_sign": agree,
        "tuning_pairs": pairs,
        "train_acc_last": avg(last.get("train_acc")),
        "val_acc_last": avg(last.get("val_acc")),
        "acc_gap_last": avg(last.get("acc_gap")),
        "loss_gap_last": avg(last.get("loss_gap")),
        "acc_gap_best": avg(best.get("acc_gap")),
        "loss_gap_best": avg(best.get("loss_gap")),
        "gap_p": compare(gap_groups(data.curves, variant), base_gaps).p
        if variant != "baseline" and base_gaps
        else math.nan,
        "best_val_point": best_point,
        "trials_complete": int(states.get("COMPLETE", 0)),
        "trials_pruned": int(states.get("PRUNED", 0)),
        "trials_failed": int(states.get("FAIL", 0)),
        "train_s_per_run": run_seconds(data.curves, variant),
        "tuned_params": tuned,
    }


def tuned_points(parent: pd.DataFrame) -> dict[str, list[float]]:
    """The best point of each tuning, from the parent run's params: best_lr, or t0.best_lr,
    t1.best_lr, ... when the cell was tuned several times."""
    tuned: dict[str, list[float]] = {}
    if parent.empty:
        return tuned
    for col in sorted(parent.columns):
        match = re.fullmatch(r"params\.(?:t\d+\.)?best_(\w+)", col)
        if match and pd.notna(parent.iloc[0][col]):
            tuned.setdefault(match[1], []).append(float(parent.iloc[0][col]))
    return tuned


def tuned_from_finals(finals: pd.DataFrame, keys) -> dict[str, list[float]]:
    """Each tuning's point from its final runs (they train with it), in tuning order: the
    tunings the table counts, also while the cell's parent is still open."""
    tuned: dict[str, list[float]] = {}
    for _, runs in sorted(finals.groupby("tuning"), key=lambda item: item[0]):
        for key in keys:
            values = runs.get(f"params.{key}", pd.Series(dtype=object)).dropna()
            if not values.empty:
                tuned.setdefault(key, []).append(float(values.iloc[0]))
    return tuned


def test_accs(runs: pd.DataFrame, variant: str) -> list[float]:
    """The variant's finished final runs' test accuracies, all tunings together."""
    return [acc for tuning in test_acc_groups(runs, variant) for acc in tuning]


def run_seconds(curves: pd.DataFrame, variant: str) -> float:
    """Mean training time of a final run (sum of its training passes between evaluation points)."""
    mine = curves[(curves.variant == variant) & (curves.metric == "train_seconds")]
    runs = mine.groupby(["tuning", "seed"]).value.sum()
    return float(runs.mean()) if not mine.empty else math.nan


def avg(values: list[float] | None) -> float:
    return statistics.mean(values) if values else math.nan


def description(data: StudyData, variant: str) -> str:
    if data.spec:
        for v in data.spec.variants:
            if v.name == variant:
                return v.description
    return ""


def checks(data: StudyData, table: pd.DataFrame) -> list[str]:
    """What the tuning playbook says to look at before trusting the table."""
    out = list(data.problems)
    spec = data.spec
    # Per cell: every tuning's trials and final seeds.
    want_trials = spec.settings.trials * spec.settings.tunings if spec else None
    want_seeds = len(spec.settings.seeds) * spec.settings.tunings if spec else None
    for row in table.itertuples():
        name = row.variant
        if row.n == 0 and row.trials_complete + row.trials_pruned == 0:
            out.append(f"{name}: not started")
            continue
        done = row.trials_complete + row.trials_pruned
        if want_trials and done < want_trials:
            out.append(f"{name}: tuning incomplete ({done} of {want_trials} trials)")
        if want_seeds and row.n < want_seeds:
            out.append(f"{name}: {row.n} of {want_seeds} final seeds finished")
        if row.trials_failed:
            out.append(f"{name}: {row.trials_failed} failed trial(s) (redone; see FAIL runs)")
        out += [f"{name}: {line}" for line in at_chance(data.runs, name)]
        if want_trials and row.trials_pruned > want_trials / 2:
            out.append(
                f"{name}: {row.trials_pruned} of {want_trials} trials pruned "
                f"(search range too wide?)"
            )
        if spec:
            variant = next((v for v in spec.variants if v.name == name), None)
            for key, values in row.tuned_params.items():
                r = variant.search.get(key) if variant else None
                for value in values:
                    if r and at_edge(value, r.low, r.high, r.log):
                        out.append(
                            f"{name}: best {key}={value:.3g} is at the edge of its range "
                            f"[{r.low:g}, {r.high:g}]; widen it"
                        )
    return out


def at_chance(runs: pd.DataFrame, variant: str) -> list[str]:
    """Final seeds that ended near chance: kept in their tuning's mean (the tuned point
    does this to some seeds), but said, since a mean holding one reads as a variant that
    is worse throughout, not one whose tuned point sometimes fails to train."""
    out = []
    for tuning, mine in scored_finals(runs, variant).groupby("tuning"):
        accs = mine.set_index("tags.seed")["metrics.test_acc"].astype(float)
        low = accs[accs < CHANCE + DIVERGED]
        if not low.empty:
            seeds = ", ".join(f"seed {seed} {acc:.2%}" for seed, acc in low.items())
            out.append(
                f"tuning {int(tuning)}: {len(low)} of {len(accs)} final seeds near chance "
                f"({seeds}; chance {CHANCE:.0%}): training diverged at its tuned point; "
                f"kept in the mean"
            )
    return out


def at_edge(value: float, low: float, high: float, log: bool, share: float = 0.05) -> bool:
    if log:
        value, low, high = math.log(value), math.log(low), math.log(high)
    span = high - low
    return value - low < share * span or high - value < share * span


def verdict(
    table: pd.DataFrame, alpha: float = ALPHA, rounds: tuple[int, int] | None = None
) -> str:
    """Each variant against the baseline, by the one rule (Holm p < alpha): test accuracy
    raised or lowered, else the largest effect its interval allows; and the train−val
    accuracy gap shrunk or widened (on the same unit as test accuracy). `rounds` (K, N): an
    interim read of K of N rounds, whose 'resolved' is so far only."""
    rest = table[(table.variant != "baseline") & table.diff_vs_baseline.notna()]
    if rest.empty:
        return "Resolved: no comparisons yet."

    def shown(r) -> str:
        return f"{r.variant} {points(r.diff_vs_baseline)} ± {r.diff_ci95 * 100:.2f}"

    resolved = rest.p_holm < alpha
    up = [shown(r) for r in rest[resolved & (rest.diff_vs_baseline > 0)].itertuples()]
    down = [shown(r) for r in rest[resolved & (rest.diff_vs_baseline < 0)].itertuples()]
    bounds = [
        f"{r.variant} < {(abs(r.diff_vs_baseline) + r.diff_ci95) * 100:.2f}"
        for r in rest[~resolved].itertuples()
    ]
    base_gap = table.loc[table.variant == "baseline", "acc_gap_last"].mean()
    gap = rest[rest.gap_p_holm < alpha]
    shrink = gap[gap.acc_gap_last < base_gap].variant.tolist()
    widen = gap[gap.acc_gap_last > base_gap].variant.tolist()
    tuned = (rest.level == "tunings").all()
    unit = "the tuning the unit" if tuned else "over the seeds of one tuning: tuning luck left out"
    gap_unit = "Welch on tuning means" if tuned else "Welch over final seeds"
    interim = f"so far (round {rounds[0]} of {rounds[1]}, an interim read; " if rounds else "("
    parts = [
        f"Resolved {interim}Holm p<{alpha:g}; {unit}), points of test accuracy: raise it: "
        + (", ".join(up) or "none"),
        "lower it: " + (", ".join(down) or "none"),
    ]
    if bounds:
        parts.append(
            "not resolved, so any effect is below (|Δ| + half-width, points): " + ", ".join(bounds)
        )
    parts.append(
        f"train−val accuracy gap resolved (Holm p<{alpha:g}, {gap_unit}): "
        f"shrunk by {', '.join(shrink) or 'none'}; widened by {', '.join(widen) or 'none'}"
    )
    return "; ".join(parts) + "."
