"""The report of a training-set-size sweep: the ablation table at each size, learning
curves across sizes, whether the baseline overfits, and per size which effects are
resolved and how small the rest must be (with several tunings: the variance components,
the calibration check and the plan)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd

from mnist_study.analysis import figures
from mnist_study.analysis.collect import StudyData
from mnist_study.analysis.luck import (
    LUCK_LEGEND,
    budget_checks,
    budget_curves,
    mean_curve,
    tuning_section,
)
from mnist_study.analysis.plan import plan_lines, size_facts
from mnist_study.analysis.summary import checks, replicated, summarize, verdict
from mnist_study.analysis.tables import TABLE_LEGEND, markdown_table
from mnist_study.files import CSV_FLOATS, write_atomic
from mnist_study.tracking.names import Role


def at_size(data: StudyData, n: int) -> StudyData:
    """The study's runs and curves at one training-set size (problems stay global)."""
    return dataclasses.replace(
        data,
        runs=data.runs[data.runs.train_size == n],
        curves=data.curves[data.curves.train_size == n],
        problems=[],
    )


def val_loss_turn(curves: pd.DataFrame, variant: str = "baseline") -> tuple[int, float, float]:
    """(point of the lowest mean validation loss, that loss, the loss at the last point)."""
    mine = curves[(curves.variant == variant) & (curves.metric == "val_loss")]
    if mine.empty:
        return 0, math.nan, math.nan
    mean = mine.groupby("point").value.mean().sort_index()
    return int(mean.idxmin()), float(mean.min()), float(mean.iloc[-1])


def overfit_line(curves: pd.DataFrame, axis: str) -> str:
    step, low, last = val_loss_turn(curves)
    if math.isnan(low):
        return "Baseline validation loss: no final runs yet."
    if last > low:
        return (
            f"Baseline validation loss: lowest {low:.3f} at {axis} {step}, {last:.3f} at the "
            f"end (+{last / low - 1:.0%}): it turned up, the net overfits at this size."
        )
    return f"Baseline validation loss: still falling at the end ({last:.3f}): no overfitting."


def budget_part(
    part: StudyData, variants: list[str], n: int, out: Path, pngs: dict[str, Path]
) -> list[str]:
    """The checks of a size's tuning budget, and (tuned several times) its budget curve
    added to `pngs`."""
    budget = budget_curves(part.runs)
    if replicated(part) and not budget.empty:
        pngs[f"budget_n{n}"] = out / f"budget_n{n}.png"
        figures.budget_figure(
            {v: mean_curve(budget[budget.variant == v]) for v in variants
             if (budget.variant == v).any()},
            pngs[f"budget_n{n}"],
            f"{n:,} training images: expected best of n trials, mean over tunings",
        )  # fmt: skip
    return budget_checks(budget, f"n={n}: ")


def sweep_section(data: StudyData, out: Path) -> tuple[list[str], dict[str, Path], list[str]]:
    """A table per size with its verdicts, the learning-curve figure, curves at every
    size: (lines, figures, checks)."""
    sizes, axis = data.spec.settings.train_sizes, data.spec.defaults.axis
    tables, found, lines = {}, list(data.problems), []
    pngs = {}
    for n in sizes:
        part = at_size(data, n)
        if part.runs[part.runs["tags.role"] != Role.VARIANT].empty:
            lines += [f"#### {n:,} training images", "", "Not started yet.", ""]
            found.append(f"n={n}: not started")
            continue
        table = summarize(part)
        tables[n] = table
        found += [f"n={n}: {c}" for c in checks(part, table)]
        _, low, last = val_loss_turn(part.curves)
        if n == sizes[0] and not last > low:
            found.append(f"n={n}: the baseline's validation loss did not turn up; train longer")
        pngs[f"curves_n{n}"] = out / f"curves_n{n}.png"
        figures.curves_figure(
            part.curves,
            data.variants,
            pngs[f"curves_n{n}"],
            x="optimizer step" if axis == "step" else "epoch",
            title=f"{n:,} training images: final runs, mean over seeds, band = min–max",
        )
        lines += [
            f"#### {n:,} training images",
            "",
            markdown_table(table, axis),
            "",
            overfit_line(part.curves, axis),
            "",
        ]
        if replicated(part):
            section, problems = tuning_section(
                part.runs, table, data.variants, f"n={n}: ", data.rounds
            )
            lines += section
            found += problems
            facts = size_facts(part.runs, data.variants, n)
            if facts is not None:
                s = data.spec.settings
                lines += [*plan_lines(facts, s.trials, seed_counts=(len(s.seeds),)), ""]
        lines += [verdict(table, rounds=data.rounds), ""]
        found += budget_part(part, data.variants, n, out, pngs)
    if tables:
        every = [t.drop(columns=["tuned_params"]).assign(train_size=n) for n, t in tables.items()]
        write_atomic(
            out / "results.csv", pd.concat(every).to_csv(index=False, float_format=CSV_FLOATS)
        )
    if len(tables) > 1:  # one size is a point, not a curve
        pngs = {"learning_curve": out / "learning_curve.png", **pngs}
        figures.learning_curve_figure(tables, pngs["learning_curve"])
    lines.append(TABLE_LEGEND)
    if replicated(data):
        lines += ["", LUCK_LEGEND]
    return lines, pngs, found
