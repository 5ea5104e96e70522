"""A cell's end: once every tuning of a cell is finished, its parent run records the
outcome (per tuning its best trial and point, prefixed t0., t1., ... when tuned several
times; the mean test accuracy of its final seeds with the report's interval) and is
closed, so MLflow's table shows one row per cell with its result. And a round's end,
said once for a study that runs in rounds."""

from __future__ import annotations

import math
import statistics

from mnist_study.intervals import acc_interval
from mnist_study.study.ledger import Ledger, TuningLedger
from mnist_study.study.stores import StudyStores
from mnist_study.tracking.names import METRIC_NAMES, ROUNDS_TAG


def close_finished_cells(
    stores: StudyStores, closed: set[str], ledger: Ledger | None = None
) -> list[str]:
    """Record each newly finished cell's outcome on its parent run and close it; a line
    each. `closed`: the cells this process has seen closed (updated); `ledger`: the
    study's state if the caller has just read it."""
    lines, ledger, tracker = [], ledger or stores.ledger(), stores.tracker
    for cell in stores.spec.cells:
        if cell.key in closed or not ledger.cell_finished(cell):
            continue
        closed.add(cell.key)
        tunings = ledger.of_cell(cell)
        tags, params, metrics = cell_outcome(tunings)
        parent = tracker.parent_run(cell.key, cell.name, cell.train_size, cell.description)
        accs = test_accs(tunings)
        status, recorded = tracker.status_and_metric(parent, METRIC_NAMES["n_final"])
        # Closed with as many final runs as now: done. Fewer: the study was extended
        # since, and the cell is closed again with the larger budget's outcome.
        if status == "FINISHED" and recorded == (len(accs) or None):
            continue
        tracker.set_tags(parent, tags)
        tracker.log_params(parent, params)
        if metrics:
            tracker.log_metrics(parent, metrics, step=0)
        tracker.finish(parent)
        lines.append(f"{cell.key}: done; test acc {fmt_accs(accs)}")
    return lines


def newly_finished_round(stores: StudyStores, ledger: Ledger) -> int | None:
    """K where `ledger` holds more rounds finished (every cell's first K tunings, which
    `report --tunings K` reads whole) than the study has said, now recorded as said on
    its experiment, so that one of its workers says it, on any host (call under the
    claim lock). None otherwise; a study tuned once has no rounds, and a complete one is
    said by its cells."""
    rounds, (finished, _, _) = stores.spec.settings.tunings, ledger.rounds()
    if not 0 < finished < rounds:
        return None
    if finished <= int(stores.tracker.experiment_tag(ROUNDS_TAG) or 0):
        return None
    stores.tracker.set_experiment_tag(ROUNDS_TAG, str(finished))
    return finished


def test_accs(tunings: list[TuningLedger]) -> list[float]:
    return [t.user_attrs["test_acc"] for state in tunings for t in state.complete_finals]


def cell_outcome(tunings: list[TuningLedger]) -> tuple[dict, dict, dict[str, float]]:
    """(tags, params, metrics) of a finished cell's parent run: each tuning's best trial,
    final seeds and best point; the final seeds' mean test accuracy with the report's
    95% interval, their sd and count, and the mean best validation accuracy."""
    tags, params, groups, best_vals = {}, {}, [], []
    for state in tunings:
        best, finals, prefix = state.best, state.complete_finals, state.tuning.prefix
        groups.append([t.user_attrs["test_acc"] for t in finals])
        tags[f"{prefix}best_trial"] = (
            best.user_attrs.get("slot", best.number) if best else "none (no trial completed)"
        )
        tags[f"{prefix}final_seeds"] = ",".join(str(t.user_attrs["seed"]) for t in finals)
        if best is not None:
            best_vals.append(best.value)
            params |= {f"{prefix}best_{k}": v for k, v in best.params.items()}
    accs = [a for group in groups for a in group]
    if not accs:
        return tags, params, {}
    mean, low, high, _ = acc_interval(groups)  # the report's interval
    shown = {"test_acc_mean": mean, "test_acc_low": low, "test_acc_high": high}
    shown |= {"test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    shown |= {"best_val_acc": statistics.mean(best_vals)}
    # In percent, to 4 decimals: what a reader of MLflow's table sees, not float noise.
    shown = {k: round(v * 100, 4) for k, v in shown.items() if not math.isnan(v)}
    return tags, params, shown | {"n_final": len(accs)}


def fmt_accs(accs: list[float]) -> str:
    if not accs:
        return "no final run completed"
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.4f} ± {sd:.4f} (n={len(accs)})"
