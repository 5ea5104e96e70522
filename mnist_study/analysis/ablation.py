"""The report of an ablation study at one training-set size: the table of all variants,
its verdict, and the figures (curves, test accuracy, gaps, tuning)."""

from __future__ import annotations

from pathlib import Path

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
from mnist_study.analysis.summary import checks, replicated, summarize, test_accs, verdict
from mnist_study.analysis.tables import TABLE_LEGEND, markdown_table
from mnist_study.files import CSV_FLOATS, write_atomic

SEED_LINE = (
    "For reference, the seed write-up (one run, untuned, 5 epochs): train ~99.7%, "
    "validation ~99.1%, test ~98.9%."
)


def ablation_section(data: StudyData, out: Path) -> tuple[list[str], dict[str, Path], list[str]]:
    """One table of all variants, its verdict and figures: (lines, figures, checks)."""
    table = summarize(data)
    write_atomic(
        out / "results.csv",
        table.drop(columns=["tuned_params"]).to_csv(index=False, float_format=CSV_FLOATS),
    )
    per_seed = {v: test_accs(data.runs, v) for v in data.variants}
    pngs = {
        "curves": out / "curves.png",
        "test_acc": out / "test_acc.png",
        "gap": out / "gap.png",
        "tuning": out / "tuning.png",
    }
    axis = data.spec.defaults.axis if data.spec else "epoch"
    figures.curves_figure(
        data.curves, data.variants, pngs["curves"], "optimizer step" if axis == "step" else axis
    )
    figures.test_figure(table, per_seed, pngs["test_acc"])
    figures.gap_figure(table, pngs["gap"])
    variants = data.spec.variants if data.spec else []
    lr_range = {
        v.name: (v.search["lr"].low, v.search["lr"].high) for v in variants if "lr" in v.search
    }
    figures.tuning_figure(data.runs, data.variants, pngs["tuning"], lr_range)
    lines, found = [markdown_table(table, axis), ""], checks(data, table)
    if replicated(data):  # the budget read over several tunings, as a sweep's cells are
        section, problems = tuning_section(data.runs, table, data.variants, rounds=data.rounds)
        budget = budget_curves(data.runs)
        lines, found = lines + section, found + problems + budget_checks(budget)
        facts = size_facts(data.runs, data.variants, None)
        if facts is not None:
            s = data.spec.settings
            lines += [*plan_lines(facts, s.trials, seed_counts=(len(s.seeds),)), ""]
        if not budget.empty:
            pngs["budget"] = out / "budget.png"
            curves = {v: mean_curve(budget[budget.variant == v]) for v in data.variants}
            figures.budget_figure(
                {v: c for v, c in curves.items() if not c.empty},
                pngs["budget"],
                "expected best validation accuracy of n trials, mean over tunings",
            )
    lines += [verdict(table, rounds=data.rounds), "", SEED_LINE, "", TABLE_LEGEND]
    if replicated(data):
        lines += ["", LUCK_LEGEND]
    return lines, pngs, found
