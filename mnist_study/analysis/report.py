"""The comparison report of a study, built from MLflow alone (any store, local or server).

One row per variant: tuned hyperparameters, test accuracy with its 95% CI over the
final seeds, the difference from the baseline with Welch's p, the generalization gap at
the last and at the best-validation epoch, trial outcomes and time. Plus figures and the
tuning playbook's sanity checks.
"""

from __future__ import annotations

import math
import re
import statistics

import pandas as pd

from mnist_study.analysis.collect import StudyData
from mnist_study.analysis.luck import comparisons, test_acc_groups
from mnist_study.analysis.significance import TuningLuck, holm, interval, welch_half_width, welch_p


def per_seed_gaps(curves: pd.DataFrame, variant: str, epoch: int | None) -> dict[str, list]:
    """Per final seed at `epoch` (None: last): accs, losses and the two gaps."""
    mine = curves[curves.variant == variant]
    if mine.empty:
        return {}
    wide = mine.pivot_table(index=["tuning", "seed", "epoch"], columns="metric", values="value")
    epoch = epoch or int(mine.epoch.max())
    at = wide.xs(epoch, level="epoch")
    return {
        "train_acc": list(at.train_acc),
        "val_acc": list(at.val_acc),
        "acc_gap": list(at.train_acc - at.val_acc),
        "loss_gap": list(at.val_loss - at.train_loss),
    }


def best_val_epoch(curves: pd.DataFrame, variant: str) -> int | None:
    mine = curves[(curves.variant == variant) & (curves.metric == "val_acc")]
    if mine.empty:
        return None
    return int(mine.groupby("epoch").value.mean().idxmax())


def replicated(data: StudyData) -> bool:
    """Whether the study tuned each cell more than once."""
    if data.spec is not None:
        return data.spec.settings.tunings > 1
    return not data.runs.empty and data.runs["tuning"].nunique() > 1


def summarize(data: StudyData) -> pd.DataFrame:
    """One row per variant: its test accuracy and its difference from the baseline (the
    interval carrying tuning luck where the study tuned each cell several times), the
    gaps, its trials and time; p-values Holm-adjusted over the variants."""
    luck = comparisons(data.runs, data.variants) if replicated(data) else {}
    base_accs = test_accs(data.runs, "baseline")
    base_gaps = per_seed_gaps(data.curves, "baseline", None).get("acc_gap", [])
    rows = []
    for variant in data.variants:
        rows.append(variant_row(data, variant, base_accs, base_gaps))
        if variant in luck:  # the comparison carries tuning luck
            rows[-1] |= luck_columns(luck[variant])
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table.p_diff)
    table["gap_p_holm"] = holm(table.gap_p_welch)
    return table


def variant_row(data: StudyData, variant: str, base_accs: list, base_gaps: list) -> dict:
    """A variant's row, its comparison over seeds alone (Welch)."""
    runs = data.runs
    mine = runs[runs["tags.variant"] == variant] if not runs.empty else runs
    parent = mine[mine["tags.role"] == "variant"] if not mine.empty else mine
    tune = mine[mine["tags.role"] == "tune"] if not mine.empty else mine
    accs = test_accs(runs, variant)
    mean, half = interval(accs) if accs else (math.nan, math.nan)
    last = per_seed_gaps(data.curves, variant, None)
    best_epoch = best_val_epoch(data.curves, variant)
    best = per_seed_gaps(data.curves, variant, best_epoch) if best_epoch else {}
    states = tune["tags.optuna_state"].value_counts() if not tune.empty else {}
    tuned = tuned_points(parent)
    seeds_p = welch_p(accs, base_accs) if variant != "baseline" else math.nan
    return {
        "variant": variant,
        "change": description(data, variant),
        "tuned": ", ".join(
            f"{k}=" + " / ".join(f"{x:.3g}" for x in tuned[k])
            for k in sorted(tuned, key=lambda k: (k != "lr", k))
        ),
        "test_acc_mean": mean,
        "test_acc_ci95": half,
        "n": len(accs),
        "diff_vs_baseline": mean - statistics.mean(base_accs) if base_accs and accs else math.nan,
        "diff_ci95": welch_half_width(accs, base_accs) if variant != "baseline" else math.nan,
        "p_welch": seeds_p,
        "p_diff": seeds_p,
        "train_acc_last": avg(last.get("train_acc")),
        "val_acc_last": avg(last.get("val_acc")),
        "acc_gap_last": avg(last.get("acc_gap")),
        "loss_gap_last": avg(last.get("loss_gap")),
        "acc_gap_best": avg(best.get("acc_gap")),
        "loss_gap_best": avg(best.get("loss_gap")),
        "gap_p_welch": welch_p(last.get("acc_gap", []), base_gaps)
        if variant != "baseline"
        else math.nan,
        "best_val_epoch": best_epoch,
        "trials_complete": int(states.get("COMPLETE", 0)),
        "trials_pruned": int(states.get("PRUNED", 0)),
        "trials_failed": int(states.get("FAIL", 0)),
        "train_s_per_run": run_seconds(data.curves, variant),
        "tuned_params": tuned,
    }


def luck_columns(luck: TuningLuck) -> dict:
    """The comparison over tunings and seeds (hierarchical bootstrap), in place of Welch's."""
    return {
        "diff_vs_baseline": luck.diff,
        "diff_ci95": luck.half_width,
        "p_diff": luck.p,
        "diff_low": luck.low,
        "diff_high": luck.high,
        "seed_ci95": luck.seed_half_width,
        "p_better": luck.p_better,
        "same_sign": luck.same_sign,
        "tunings": luck.tunings,
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


def test_accs(runs: pd.DataFrame, variant: str) -> list[float]:
    """The variant's finished final runs' test accuracies, all tunings together."""
    return [acc for tuning in test_acc_groups(runs, variant) for acc in tuning]


def run_seconds(curves: pd.DataFrame, variant: str) -> float:
    """Mean training time of a final run (sum of its epochs' training passes)."""
    mine = curves[(curves.variant == variant) & (curves.metric == "epoch_seconds")]
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


def at_edge(value: float, low: float, high: float, log: bool, share: float = 0.05) -> bool:
    if log:
        value, low, high = math.log(value), math.log(low), math.log(high)
    span = high - low
    return value - low < share * span or high - value < share * span


def verdict(table: pd.DataFrame) -> str:
    """From the numbers: who closes the gap, who beats seed noise on test, judged by
    Holm-adjusted Welch p-values (uncorrected ones named alongside)."""
    rest = table[table.variant != "baseline"]
    base_gap = table.loc[table.variant == "baseline", "acc_gap_last"].mean()

    def passing(p_column: str, sign_ok: pd.Series) -> str:
        strict = rest[(rest[p_column] < 0.05) & sign_ok].variant.tolist()
        uncorrected = {"p_holm": "p_diff", "gap_p_holm": "gap_p_welch"}[p_column]
        loose = rest[(rest[uncorrected] < 0.05) & sign_ok]
        loose = [v for v in loose.variant if v not in strict]
        text = ", ".join(strict) or "none"
        return text + (f" (uncorrected p<0.05 only: {', '.join(loose)})" if loose else "")

    test = "the hierarchical bootstrap" if "p_better" in table else "Welch's t-test over the seeds"
    parts = [
        f"Test accuracy by {test}, the gap by Welch's t-test over the seeds, each "
        f"Holm-adjusted for {len(rest)} comparisons with the baseline, p<0.05. "
        "Shrink the train−val accuracy gap: " + passing("gap_p_holm", rest.acc_gap_last < base_gap),
        "raise test accuracy beyond seed noise: " + passing("p_holm", rest.diff_vs_baseline > 0),
    ]
    worse = rest[(rest.p_holm < 0.05) & (rest.diff_vs_baseline < 0)].variant.tolist()
    if worse:
        parts.append("lower it: " + ", ".join(worse))
    return "; ".join(parts) + "."
