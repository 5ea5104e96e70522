"""The report's figures (matplotlib, headless), sized to be read at README width."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mnist_study.files import write_atomic
from mnist_study.tracking.names import Role

TITLES = {
    "train_loss": "train loss (clean pass)",
    "val_loss": "validation loss",
    "train_acc": "train accuracy (clean pass)",
    "val_acc": "validation accuracy",
}


def save(fig, path: Path, dpi: int) -> None:
    """The PNG rendered in memory, then written whole (a failed write keeps the old one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def colors(variants: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def curves_figure(
    curves: pd.DataFrame, variants: list[str], path: Path, x: str = "epoch", title: str = ""
) -> None:
    """2x2 panels, every variant on shared axes: mean over seeds, band = min..max.
    `x` names what the curves' steps count (epochs, or optimizer steps)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    palette = colors(variants)
    for ax, metric in zip(axes.flat, TITLES, strict=True):
        for v in variants:
            mine = curves[(curves.variant == v) & (curves.metric == metric)]
            if mine.empty:
                continue
            scale = 100 if metric.endswith("acc") else 1  # accuracy in %, as in every table
            g = (mine.value * scale).groupby(mine.point)
            mean, lo, hi = g.mean(), g.min(), g.max()
            ax.plot(mean.index, mean.values, marker="o", ms=3, label=v, color=palette[v])
            ax.fill_between(mean.index, lo.values, hi.values, alpha=0.15, color=palette[v])
        ax.set_title(TITLES[metric])
        ax.set_ylabel("accuracy (%)" if metric.endswith("acc") else "cross-entropy")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4) or 1, frameon=False)
    fig.suptitle(title or "Final runs per variant: mean over seeds, band = min–max")
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    save(fig, path, dpi=110)


def bar(r) -> tuple[float, float]:
    """A row's 95% interval as (below, above) the mean in points, clipped to [0, 100]%
    as the table prints it; (0, 0) without one."""
    if math.isnan(r.test_acc_low):
        return 0.0, 0.0
    low, high = max(r.test_acc_low, 0.0), min(r.test_acc_high, 1.0)
    return (r.test_acc_mean - low) * 100, (high - r.test_acc_mean) * 100


def test_figure(table: pd.DataFrame, per_seed: dict[str, list[float]], path: Path) -> None:
    """Test accuracy per variant: mean with 95% CI, and each seed as a dot."""
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(table) + 1.5))
    palette = colors(list(table.variant))
    for i, r in enumerate(table.itertuples()):
        if math.isnan(r.test_acc_mean):
            continue
        err = [[side] for side in bar(r)]
        ax.errorbar(
            r.test_acc_mean * 100, i, xerr=err, fmt="o", capsize=4, color=palette[r.variant]
        )
        ax.scatter(
            [a * 100 for a in per_seed.get(r.variant, [])],
            [i] * len(per_seed.get(r.variant, [])),
            s=12,
            color="grey",
            alpha=0.6,
            zorder=3,
        )
    base = table.loc[table.variant == "baseline", "test_acc_mean"]
    if len(base) and not math.isnan(base.iat[0]):
        ax.axvline(base.iat[0] * 100, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(table)), list(table.variant))
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(
        "Test accuracy: mean, 95% interval as in the table (dots: seeds; dashed: baseline)"
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save(fig, path, dpi=110)


def gap_figure(table: pd.DataFrame, path: Path) -> None:
    """Train − validation accuracy gap per variant, at the last and best-val epoch."""
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(table) + 1.5))
    y = range(len(table))
    # Greys: the variants' colours in the other figures mean variants, not these two.
    last, best = table.acc_gap_last * 100, table.acc_gap_best * 100
    ax.barh([i - 0.2 for i in y], last, height=0.4, color="0.25", label="last evaluation")
    ax.barh([i + 0.2 for i in y], best, height=0.4, color="0.7", label="best-validation point")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(list(y), list(table.variant))
    ax.invert_yaxis()
    ax.set_xlabel("train − validation accuracy (percentage points)")
    ax.set_title("Generalization gap (mean over final seeds)")
    ax.legend(frameon=False, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save(fig, path, dpi=110)


def tuning_figure(
    runs: pd.DataFrame, variants: list[str], path: Path, lr_range: dict[str, tuple] | None = None
) -> None:
    """What tuning tried, per variant: each trial's validation accuracy against its
    learning rate (log axis; dotted: the searched range, `lr_range`), one accuracy scale
    for every panel, the chosen trial starred; a best point at the range's edge says
    the range was too narrow."""
    cols = 4
    rows = max(1, math.ceil(len(variants) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.6 * rows + 0.6), squeeze=False, sharey=True)
    tune = runs[runs["tags.role"] == Role.TUNE] if not runs.empty else runs
    for ax, v in zip(axes.flat, variants, strict=False):
        ax.set_title(v)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
        if v in (lr_range or {}):  # the whole range searched, its ends dotted
            low, high = lr_range[v]
            ax.set_xlim(low / 1.4, high * 1.4)
            for edge in (low, high):
                ax.axvline(edge, color="grey", ls=":", lw=1)
        mine = tune[tune["tags.variant"] == v] if not tune.empty else tune
        if mine.empty or "params.lr" not in mine:
            continue
        lr, acc = mine["params.lr"].astype(float), mine["metrics.val_acc"] * 100
        for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
            part = mine["tags.optuna_state"] == state
            ax.scatter(lr[part], acc[part], marker=marker, s=18, color="0.3", label=state.lower())
        done = acc[mine["tags.optuna_state"] == "COMPLETE"]
        if not done.empty:  # per tuning, its best complete trial (several when replicated)
            tuning = mine.get("tags.tuning", pd.Series("0", index=mine.index))
            best = done.groupby(tuning[done.index]).idxmax()
            ax.scatter(lr[best], acc[best], marker="*", s=90, color="C3", label="chosen", zorder=3)
    for ax in axes.flat[len(variants) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("val acc (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle("Tuning: validation accuracy (at the last point reached) by learning rate")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    save(fig, path, dpi=100)


def learning_curve_figure(tables: dict[int, pd.DataFrame], path: Path) -> None:
    """Across training-set sizes (log axis), one line per variant: test accuracy (mean,
    95% interval as in the tables) and the train − validation accuracy gap at the last point."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    sizes = sorted(tables)
    variants = list(dict.fromkeys(v for t in tables.values() for v in t.variant))
    palette = colors(variants)
    for i, v in enumerate(variants):
        rows = [tables[n].set_index("variant").loc[v] for n in sizes]
        # A small horizontal offset per variant keeps the error bars apart.
        xs = [n * 1.025 ** (i - len(variants) / 2) for n in sizes]
        acc = [r.test_acc_mean * 100 for r in rows]
        err = list(zip(*(bar(r) for r in rows), strict=True))  # (below..., above...)
        left.errorbar(xs, acc, yerr=err, marker="o", ms=4, capsize=3, label=v, color=palette[v])
        right.plot(xs, [r.acc_gap_last * 100 for r in rows], marker="o", ms=4, color=palette[v])
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training images")
        ax.grid(alpha=0.3)
    left.set_ylabel("test accuracy (%)")
    left.set_title("Test accuracy: mean, 95% interval as in the tables")
    right.axhline(0, color="black", lw=0.8)
    right.set_ylabel("train − validation accuracy (points)")
    right.set_title("Generalization gap at the last evaluation")
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    save(fig, path, dpi=110)


def budget_figure(lines: dict[str, pd.Series], path: Path, title: str) -> None:
    """Expected best validation accuracy against the number of trials, one line per
    variant (`lines`: variant -> accuracy by trials): a line still rising at the right
    was under-tuned."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = colors(list(lines))
    for v, mean in lines.items():
        ax.plot(mean.index, mean.values * 100, marker="o", ms=3, label=v, color=palette[v])
    ax.set_xscale("log", base=2)
    last = max(int(mean.index.max()) for mean in lines.values())
    ticks = [2**k for k in range(last.bit_length()) if 2**k <= last]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("trials")
    ax.set_ylabel("expected best validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, ncol=2)
    fig.tight_layout()
    save(fig, path, dpi=110)
