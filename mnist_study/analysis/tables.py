"""The study table in Markdown, and the legend that says how to read it."""

from __future__ import annotations

import math

import pandas as pd


def pct(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}%}"


def points(x: float) -> str:
    """A difference of accuracies in signed points; one that rounds to zero is 0.00, not
    -0.00 (a sign it does not have at that precision)."""
    shown = f"{x * 100:+.2f}"
    return "0.00" if shown in ("+0.00", "-0.00") else shown


def markdown_table(table: pd.DataFrame, point: str = "epoch") -> str:
    """`point`: what the best-validation column counts (epoch, or optimizer step)."""
    head = (
        "| variant | change | tuned | test acc [95%] | n | Δ test, points ± half-width (p) "
        f"| train acc | val acc | acc gap last / best | loss gap last / best | best {point} "
        "| trials C/P/F | s/run |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in table.itertuples():
        ci = (
            ""
            if math.isnan(r.test_acc_low)
            else f" [{r.test_acc_low * 100:.2f}, {r.test_acc_high * 100:.2f}]"
        )
        test = "–" if math.isnan(r.test_acc_mean) else f"{r.test_acc_mean:.2%}{ci}"
        diff = (
            ""
            if math.isnan(r.diff_vs_baseline) or r.variant == "baseline"
            else f"{points(r.diff_vs_baseline)} ± {r.diff_ci95 * 100:.2f} "
            f"(p={r.p_diff:.2g}, Holm {r.p_holm:.2g})"
        )
        loss = (
            "–" if math.isnan(r.loss_gap_last) else f"{r.loss_gap_last:.4f} / {r.loss_gap_best:.4f}"
        )
        secs = "–" if math.isnan(r.train_s_per_run) else f"{r.train_s_per_run:.0f}"
        epoch = "–" if pd.isna(r.best_val_point) else f"{r.best_val_point:.0f}"
        lines.append(
            f"| {r.variant} | {r.change} | {r.tuned or '–'} | {test} | {r.n} | {diff or '–'} "
            f"| {pct(r.train_acc_last)} | {pct(r.val_acc_last)} "
            f"| {pct(r.acc_gap_last)} / {pct(r.acc_gap_best)} | {loss} "
            f"| {epoch} | {r.trials_complete}/{r.trials_pruned}/"
            f"{r.trials_failed} | {secs} |"
        )
    return "\n".join(lines)


TABLE_LEGEND = (
    "Test acc: mean [95% t-interval, clipped to 0–100%]: over the tunings' means where "
    "each cell was tuned several times (their luck counted), else over the final seeds "
    "of its one tuning (tuning luck left out). Δ test: difference from the baseline ± "
    "the half-width of its 95% Welch interval, with p and Holm's p over all variants: "
    "Welch on the tunings' means where both arms were tuned several times, else Welch "
    "over the final seeds (an interval that leaves the luck of tuning out). n: final "
    "runs. Gaps: train − validation accuracy and validation − train loss, at the last "
    "and at the best-validation point. Trials C/P/F: complete / pruned / failed. s/run: "
    "training time of one final run."
)
