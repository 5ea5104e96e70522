"""What a study would take: from a finished study's variance components and its measured
seconds per run, the smallest effect each design (R tunings x n seeds per cell) detects
at 80% power under the verdict rule, its runs and its wall time on W workers."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd

from mnist_study.analysis.luck import test_acc_groups
from mnist_study.analysis.summary import ALPHA
from mnist_study.analysis.variance import Components, components, detectable_effect
from mnist_study.tracking.names import Role

POWER = 0.8
TUNINGS = (3, 5, 8, 10, 15, 20)
SEEDS = (2, 4, 8)
WIDE = 64
"""The larger worker count the plan shows beside this machine's cores."""


MOST_TUNINGS = 20
"""The most tunings per cell a plan proposes (at 1,000 images ~7 h of a 2-core machine).
A comparison that needs more to detect the effect asked for is priced, not bought: the
plan says what the design it proposes detects there instead."""


@dataclass(frozen=True)
class SizeFacts:
    """What the plan needs of one training-set size of a pilot study."""

    size: int | None
    cells: int
    arms: dict[str, Components]
    """The arms tuned at least twice, the baseline first: each comparison is priced from
    its own two arms, so one arm's spread (a diverged seed, an unlucky tuning) moves only
    its own comparison."""
    tune_s: dict[str, float]
    """Per cell: seconds of one tuning run (pruned ones included; seconds_per_run)."""
    final_s: dict[str, float]
    """Per cell: seconds of one final run (seconds_per_run)."""

    @property
    def comparisons(self) -> int:
        return max(1, self.cells - 1)

    @property
    def variants(self) -> list[str]:
        """The compared arms priced: every arm but the baseline."""
        return list(self.arms)[1:]

    def mean_var(self, arm: str, seeds: int) -> float:
        """Variance of one tuning's mean over `seeds` seeds in this arm."""
        a = self.arms[arm]
        return a.tuning_var + (0.0 if math.isnan(a.seed_var) else a.seed_var / seeds)

    def detectable(self, variant: str, tunings: int, seeds: int) -> float:
        """The smallest Δ of this variant over the baseline that R tunings x n seeds per
        cell detect under the verdict rule."""
        return detectable_effect(
            self.mean_var(variant, seeds),
            self.mean_var(next(iter(self.arms)), seeds),
            tunings,
            ALPHA / self.comparisons,
            POWER,
        )


def size_facts(runs: pd.DataFrame, variants: list[str], size: int | None) -> SizeFacts | None:
    """The pilot's facts at one size; None where the baseline (the first variant) or
    every other arm lacks two tunings with finals."""
    part = runs if size is None else runs[runs.train_size == size]
    arms = {v: components(test_acc_groups(part, v)) for v in variants}
    arms = {v: a for v, a in arms.items() if a.tunings >= 2}
    if variants[0] not in arms or len(arms) < 2:
        return None
    return SizeFacts(
        size=size,
        cells=len(variants),
        arms=arms,
        tune_s=seconds_per_run(part, Role.TUNE),
        final_s=seconds_per_run(part, Role.FINAL),
    )


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
    """The design table at one size, in Markdown: per design its runs, wall times and the
    smallest Δ each comparison detects."""
    workers = worker_counts(workers)
    where = f"{facts.size:,} training images" if facts.size else "this study"
    spreads = ", ".join(
        f"{v} {math.sqrt(a.tuning_var) * 100:.2f} / {math.sqrt(a.seed_var) * 100:.2f}"
        for v, a in facts.arms.items()
    )
    lines = [
        f"Plan at {where}: each comparison is priced from its own two arms (tuning sd / seed "
        f"sd, points: {spreads}); the smallest Δ over the baseline each detects with "
        f"{POWER:.0%} power at Holm-adjusted p < {ALPHA:g} over {facts.comparisons} "
        f"comparisons (Welch on tuning means, simulated), {trials} trials per tuning, wall "
        f"time at least the larger of work / workers and one tuning's chain:",
        "",
        "| tunings R | seeds n | runs | "
        + "".join(f"wall on {w} workers | " for w in workers)
        + "".join(f"Δ {v}, points | " for v in facts.variants).rstrip(),
        "|---|---|---|" + "---|" * (len(workers) + len(facts.variants)),
    ]
    for tunings in TUNINGS:
        for seeds in seed_counts:
            runs = facts.cells * tunings * (trials + seeds)
            walls = "".join(
                f"{hours(wall_seconds(facts, tunings, seeds, trials, w))} | " for w in workers
            )
            effects = "".join(
                f"{facts.detectable(v, tunings, seeds) * 100:.2f} | " for v in facts.variants
            )
            lines.append(f"| {tunings} | {seeds} | {runs:,} | {walls}{effects}".rstrip())
    return lines


def smallest_design(
    facts: SizeFacts, variant: str, effect: float, seeds: int, most: int = MOST_TUNINGS
) -> int | None:
    """The fewest tunings (2 to `most`) with which this variant's comparison detects
    `effect` with `seeds` seeds per tuning; None if even `most` do not. Bisection: more
    tunings detect less."""

    def enough(tunings: int) -> bool:
        return facts.detectable(variant, tunings, seeds) <= effect

    if not enough(most):
        return None
    low, high = 2, most  # enough(high) holds
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle + 1, high)
    return high


def design(
    facts: SizeFacts, effect: float, seeds: int, most: int = MOST_TUNINGS
) -> tuple[int | None, dict[str, int | None]]:
    """(the tunings per cell the plan proposes, each comparison's fewest): the most any
    comparison needs to detect `effect`, among those that `most` tunings can serve; None
    if none can. It reads the variances alone, never a Δ, so a study sized by it at an
    interim round keeps its error rates (tests/test_significance.py)."""
    fewest = {v: smallest_design(facts, v, effect, seeds, most) for v in facts.variants}
    served = [t for t in fewest.values() if t is not None]
    return (max(served) if served else None), fewest


def effect_line(
    facts: SizeFacts, effect: float, seeds: int, trials: int, workers: tuple[int, ...], where: str
) -> str:
    """Per comparison the fewest tunings per cell that detect `effect` points; the design
    that serves them all (up to MOST_TUNINGS), with what it costs and what it detects in
    the comparisons it cannot serve."""
    tunings, fewest = design(facts, effect / 100, seeds)
    each = ", ".join(
        f"{v} {t}" if t is not None else f"{v} more than {MOST_TUNINGS}" for v, t in fewest.items()
    )
    line = (
        f"To detect {effect:g} points at {where} with {seeds} seeds per tuning, tunings per "
        f"cell by comparison: {each}. "
    )
    if tunings is None:
        return line + f"No design of up to {MOST_TUNINGS} tunings per cell serves any of them."
    walls = ", ".join(
        f"{hours(wall_seconds(facts, tunings, seeds, trials, w))} on {w} workers" for w in workers
    )
    runs = facts.cells * tunings * (trials + seeds)
    line += (
        f"The most any comparison needs, up to {MOST_TUNINGS}: {tunings} tunings per cell "
        f"({runs:,} runs; {walls})"
    )
    unserved = [v for v, t in fewest.items() if t is None]
    if not unserved:
        return line + "."
    others = ", ".join(f"{v} {facts.detectable(v, tunings, seeds) * 100:.2f}" for v in unserved)
    return line + f"; with it the others detect: {others} points."


def pilots_in(tracking_uri: str) -> list[str]:
    """The studies in the store that were tuned several times (their recorded
    `study.tunings` at least 2): those a plan can be read from."""
    from mnist_study.study.record import NoStudy, StudyRecord
    from mnist_study.tracking.store import studies

    found = []
    for name, _, tags in studies(tracking_uri):
        try:  # the recorded study read as every resume reads it
            record = StudyRecord.from_tags(tags, name)
        except NoStudy:
            continue
        tunings = record.spec.settings.tunings
        if tunings >= 2:
            found.append(name)
    return found


def no_pilot(study: str, tracking_uri: str, spec_path: str, lacks: str) -> str:
    """Why `plan` has nothing to read in `study` (it `lacks` ...), and where it could
    read instead: a study of the store tuned several times, or how to make one."""
    others = [name for name in pilots_in(tracking_uri) if name != study]
    where = (
        f"studies here tuned several times: {', '.join(others)} (--pilot NAME)"
        if others
        else f"none here is; set study.tunings = 2 in {spec_path} and run it (extending "
        "keeps its runs), or run make replication"
    )
    return f"study {study!r} {lacks} ({tracking_uri}); {where}"
