"""What a study would take: from a finished study's variance components and its measured
seconds per run, the smallest effect each design (R tunings x n seeds per cell) detects
at 80% power under the verdict rule, its runs and its wall time on W workers."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd

from mnist_study.analysis.luck import test_acc_groups
from mnist_study.analysis.report import ALPHA
from mnist_study.analysis.variance import (
    Components,
    components,
    detectable_effect,
    pooled_seed_var,
)
from mnist_study.tracking.names import Role

POWER = 0.8
TUNINGS = (3, 5, 8, 10, 15, 20)
SEEDS = (2, 4, 8)
WIDE = 64
"""The larger worker count the plan shows beside this machine's cores."""


@dataclass(frozen=True)
class SizeFacts:
    """What the plan needs of one training-set size of a pilot study."""

    size: int | None
    cells: int
    tuning_var: float
    """Mean over the arms of their between-tuning variance (accuracy, squared)."""
    seed_var: float
    tune_s: dict[str, float]
    """Per cell: seconds of one tuning run (pruned ones included; seconds_per_run)."""
    final_s: dict[str, float]
    """Per cell: seconds of one final run (seconds_per_run)."""

    @property
    def comparisons(self) -> int:
        return max(1, self.cells - 1)

    def detectable(self, tunings: int, seeds: int) -> float:
        """The smallest Δ R tunings x n seeds per cell detect under the verdict rule."""
        mean_var = self.tuning_var + self.seed_var / seeds
        return detectable_effect(mean_var, tunings, ALPHA / self.comparisons, POWER)


def size_facts(runs: pd.DataFrame, variants: list[str], size: int | None) -> SizeFacts | None:
    """The pilot's facts at one size; None where no arm has two tunings with finals."""
    part = runs if size is None else runs[runs.train_size == size]
    arms = [components(test_acc_groups(part, v)) for v in variants]
    arms = [a for a in arms if a.tunings >= 2]
    if not arms:
        return None
    tuning_var, seed_var = pooled(arms)
    return SizeFacts(
        size=size,
        cells=len(variants),
        tuning_var=tuning_var,
        seed_var=seed_var,
        tune_s=seconds_per_run(part, Role.TUNE),
        final_s=seconds_per_run(part, Role.FINAL),
    )


def pooled(arms: list[Components]) -> tuple[float, float]:
    """What the plan designs with, from arms tuned at least twice: (the mean of their
    between-tuning variances, their pooled seed variance)."""
    return sum(a.tuning_var for a in arms) / len(arms), pooled_seed_var(arms)


def seconds_per_run(runs: pd.DataFrame, role: str) -> dict[str, float]:
    """Per variant: the mean seconds of a finished run of this role, each kind of ending
    (complete, pruned) at its median weighed by its count. Runs of one kind in one cell
    do the same work, so the median leaves out a run that was paused (a stopped process,
    a suspended job, a sleeping laptop), which a mean would spread over the plan."""
    done = runs[(runs.status == "FINISHED") & runs.end_time.notna() & (runs["tags.role"] == role)]
    seconds = (done.end_time - done.start_time).dt.total_seconds()
    kind = done.get("tags.outcome", pd.Series("", index=done.index)).fillna("")
    by_kind = seconds.groupby([done["tags.variant"], kind]).agg(["median", "size"])
    weighed = (by_kind["median"] * by_kind["size"]).groupby(level=0).sum()
    return (weighed / by_kind["size"].groupby(level=0).sum()).to_dict()


def wall_seconds(facts: SizeFacts, tunings: int, seeds: int, trials: int, workers: int) -> float:
    """At least the larger of: all the work spread over the workers, and the longest
    chain (a tuning's trials one after another, then one final run; its seeds run side by
    side)."""
    cells = list(facts.tune_s) or ["?"]
    tune = {c: facts.tune_s.get(c, math.nan) for c in cells}
    final = {c: facts.final_s.get(c, tune[c]) for c in cells}
    work = sum(tunings * (trials * tune[c] + seeds * final[c]) for c in cells)
    chain = max(trials * tune[c] + final[c] for c in cells)
    return max(work / workers, chain)


def plan_rows(
    facts: SizeFacts, trials: int, workers: tuple[int, ...], seed_counts: tuple[int, ...]
) -> list[dict]:
    rows = []
    for tunings in TUNINGS:
        for seeds in seed_counts:
            row = {
                "tunings": tunings,
                "seeds": seeds,
                "effect": facts.detectable(tunings, seeds),
                "runs": facts.cells * tunings * (trials + seeds),
            }
            for w in workers:
                row[f"wall_{w}"] = wall_seconds(facts, tunings, seeds, trials, w)
            rows.append(row)
    return rows


def hours(seconds: float) -> str:
    if math.isnan(seconds):
        return "–"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def worker_counts(asked: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The worker counts a plan prices: those asked, else this machine's cores and WIDE."""
    return asked or (os.cpu_count() or 1, WIDE)


def plan_lines(
    facts: SizeFacts,
    trials: int,
    workers: tuple[int, ...] | None = None,
    seed_counts: tuple[int, ...] = SEEDS,
) -> list[str]:
    """The design table at one size, in Markdown."""
    workers = worker_counts(workers)
    where = f"{facts.size:,} training images" if facts.size else "this study"
    lines = [
        f"Plan at {where}: tuning sd {math.sqrt(facts.tuning_var) * 100:.2f}, seed sd "
        f"{math.sqrt(facts.seed_var) * 100:.2f} points (pooled over the arms); the smallest "
        f"Δ detected with {POWER:.0%} power at Holm-adjusted p < {ALPHA:g} over "
        f"{facts.comparisons} comparisons (Welch on tuning means, simulated), {trials} trials per "
        f"tuning, wall time at least the larger of work / workers and one tuning's chain:",
        "",
        "| tunings R | seeds n | detectable Δ, points | runs | "
        + " | ".join(f"wall on {w} workers" for w in workers)
        + " |",
        "|---|---|---|---|" + "---|" * len(workers),
    ]
    for r in plan_rows(facts, trials, workers, seed_counts):
        walls = " | ".join(hours(r[f"wall_{w}"]) for w in workers)
        lines.append(
            f"| {r['tunings']} | {r['seeds']} | {r['effect'] * 100:.2f} | {r['runs']:,} | {walls} |"
        )
    return lines


def smallest_design(facts: SizeFacts, effect: float, seeds: int, most: int = 100) -> int | None:
    """The fewest tunings (2 to `most`) whose detectable Δ is at most `effect` with
    `seeds` seeds per tuning; None if even `most` do not. Bisection: more tunings
    detect less."""

    def enough(tunings: int) -> bool:
        return facts.detectable(tunings, seeds) <= effect

    if not enough(most):
        return None
    low, high = 2, most  # enough(high) holds
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle + 1, high)
    return high


def effect_line(
    facts: SizeFacts, effect: float, seeds: int, trials: int, workers: tuple[int, ...], where: str
) -> str:
    """The fewest tunings per cell that detect `effect` points, with what they cost."""
    fewest = smallest_design(facts, effect / 100, seeds)
    line = f"To detect {effect:g} points at {where} with {seeds} seeds per tuning: "
    if fewest is None:
        return line + "more than 100 tunings per cell."
    walls = ", ".join(
        f"{hours(wall_seconds(facts, fewest, seeds, trials, w))} on {w} workers" for w in workers
    )
    runs = facts.cells * fewest * (trials + seeds)
    return line + f"{fewest} tunings per cell ({runs:,} runs; {walls})."
