"""A study read back from MLflow alone (any store, local or server), cross-checked against
Optuna's record where it is given: the runs the report may count, and why any are not."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pandas as pd

from mnist_study.study.spec import StudySpec
from mnist_study.study.stored import read_stored
from mnist_study.study.stores import open_runs_of_ended_trials
from mnist_study.tracking.legacy import metric_history, upgrade_runs
from mnist_study.tracking.names import Role
from mnist_study.tracking.runs import runs_frame

CURVES = ("train_loss", "val_loss", "train_acc", "val_acc", "train_seconds")


@dataclass
class StudyData:
    """A study as its report reads it."""

    name: str
    spec: StudySpec | None
    runs: pd.DataFrame
    curves: pd.DataFrame  # final runs: variant, seed, epoch, metric, value
    variants: list[str]
    problems: list[str] = field(default_factory=list)
    extended: str = ""
    """How the study was extended after it started ('study.tunings 3 -> 8'), if it was."""
    mixed: str = ""
    """Each change of code, threads, device or data a resume was allowed (--allow-mixed)."""
    planned: int | None = None
    """The tunings per cell the study plans, where a stage reads fewer."""
    restored: str = ""
    """Where tunings restored from published raw runs came from (run --restore), if any."""

    @property
    def rounds(self) -> tuple[int, int] | None:
        """(K, N) where this is a read of the first K of the study's N tunings per cell."""
        return (self.spec.settings.tunings, self.planned) if self.planned and self.spec else None

    @property
    def stage(self) -> str:
        """Where the report reads part of a study (its first K tunings), which part."""
        if not self.rounds:
            return ""
        # A verdict read at every round would be tested several times; the plan's is the last.
        k, n = self.rounds
        return (
            f"the first {k} of its {n} tunings per cell, an interim read: its verdicts are "
            f"those of all {n}"
        )

    def progress(self) -> tuple[int, int]:
        """(runs finished, runs the spec plans): tuning trials ended (complete or pruned)
        and final seeds, of every cell's tunings (a stage's alone); (0, 0) without a spec."""
        if self.spec is None:
            return 0, 0
        s = self.spec.settings
        planned = len(self.spec.cells) * s.tunings * (s.trials + len(s.seeds))
        if self.runs.empty:
            return 0, planned
        # A diverged run is FAILED in MLflow but its unit is done: Optuna prunes it for good.
        diverged = self.runs.get("tags.outcome", pd.Series(index=self.runs.index)) == "diverged"
        ended = self.runs["tags.role"].isin([Role.TUNE, Role.FINAL]) & (
            (self.runs.status == "FINISHED") | diverged
        )
        return min(int(ended.sum()), planned), planned


def final_curves(tracking_uri: str, finals: pd.DataFrame) -> pd.DataFrame:
    """The final runs' curves, one row per run, metric and evaluation point."""
    rows = [
        (run["tags.variant"], run["train_size"], int(run["tuning"]), int(run["tags.seed"]),
         m.step, metric, m.value)
        for _, run in finals.iterrows()
        for metric in CURVES
        for m in metric_history(tracking_uri, run.run_id, metric)
    ]  # fmt: skip
    return pd.DataFrame(
        rows, columns=["variant", "train_size", "tuning", "seed", "point", "metric", "value"]
    )


def collect(
    tracking_uri: str, study: str, storage: str | None = None, tunings: int | None = None
) -> StudyData:
    """Everything the report reads: the recorded spec, the runs it may count (with the
    problems found on the way), and the final runs' curves; with `tunings`, only those
    of every cell's first `tunings` tunings (a stage of a study that runs in rounds)."""
    stored = read_stored(tracking_uri, study, storage)
    if stored is None:
        missing = [f"no MLflow experiment named {study!r} in {tracking_uri}"]
        return StudyData(study, None, pd.DataFrame(), pd.DataFrame(), [], missing)
    problems: list[str] = []
    record = stored.record
    spec = record.spec
    runs = runs_frame(tracking_uri, stored.experiment_id)
    if runs.empty:
        return StudyData(study, spec, runs, pd.DataFrame(), [], problems + ["no runs recorded yet"])
    # A run reaped after its worker died ends when it was reaped, perhaps long after; its
    # last logged epoch is when it really stopped (the study's wall time depends on it).
    for i in runs.index[runs.status == "KILLED"]:
        history = metric_history(tracking_uri, runs.at[i, "run_id"], "train_seconds")
        last = max((m.timestamp for m in history), default=None)
        runs.at[i, "end_time"] = (
            pd.Timestamp(last, unit="ms", tz="UTC") if last else runs.at[i, "start_time"]
        )
    runs = upgrade_runs(runs)
    runs, found = counted_runs(runs, spec, stored.side)
    problems += found
    curves = final_curves(tracking_uri, runs[runs["tags.role"] == Role.FINAL])
    seen = list(dict.fromkeys(runs["tags.variant"].dropna()))
    variants = [v.name for v in spec.variants] if spec else seen
    data = StudyData(study, spec, runs, curves, variants, problems, record.extensions, record.mixes)
    return stage(data, tunings)


def stage(data: StudyData, tunings: int | None) -> StudyData:
    """The study's first `tunings` tunings per cell alone (a stage of a study that runs in
    rounds), as if it had planned them, with the tunings it does plan kept as `planned`;
    the whole study where `tunings` is None or not fewer than it plans."""
    spec = data.spec
    if tunings is None or spec is None or tunings >= spec.settings.tunings:
        return data
    curves = data.curves
    return dataclasses.replace(
        data,
        spec=dataclasses.replace(
            spec, settings=spec.settings.model_copy(update={"tunings": tunings})
        ),
        runs=data.runs[data.runs.tuning < tunings],
        curves=curves[curves.tuning < tunings] if not curves.empty else curves,
        planned=spec.settings.tunings,
    )


def counted_runs(
    runs: pd.DataFrame, spec: StudySpec | None, side
) -> tuple[pd.DataFrame, list[str]]:
    """The runs the report may count: those Optuna links to a trial (when its record,
    `side`, is readable), one per tuning trial, and one per final seed of the spec. Every
    run left out is named in the checks, so duplicates can never narrow an interval
    unseen; so is every failed trial that has no run to show for it."""
    problems = [side] if isinstance(side, str) else []
    children = runs["tags.role"].isin([Role.TUNE, Role.FINAL])
    if not isinstance(side, str):
        if side.runless:
            problems.append(
                f"{len(side.runless)} failed trial(s) have no MLflow run (their worker died "
                f"between claiming and creating it; redone): {', '.join(side.runless)}"
            )
        still_open = open_runs_of_ended_trials(
            side, dict(zip(runs.run_id, runs.status, strict=True))
        )
        if still_open:
            problems.append(
                f"{len(still_open)} MLflow run(s) still RUNNING although their trial ended "
                f"(the stores disagree; resuming the study closes them)"
            )
        orphans = children & ~runs.run_id.isin(set(side.run_ids))
        if orphans.any():
            problems.append(
                f"{int(orphans.sum())} MLflow run(s) match no Optuna trial (orphans of a lost "
                f"or replaced storage): not counted"
            )
        runs = runs[~orphans]
    runs = runs.sort_values("start_time")
    keep = pd.Series(True, index=runs.index)
    finished_finals = (runs["tags.role"] == Role.FINAL) & (runs.status == "FINISHED")
    for (cell, _), mine in runs[finished_finals].groupby(["cell", "tuning"]):
        seeds = mine["tags.seed"].astype(int)
        if spec is not None:
            extra = ~seeds.isin(spec.settings.seeds)
            if extra.any():
                problems.append(
                    f"{cell}: final runs of seeds {sorted(set(seeds[extra]))} not in the "
                    f"spec (extras): not counted"
                )
                keep[mine.index[extra]] = False
        repeated = seeds.duplicated()
        if repeated.any():
            problems.append(
                f"{cell}: {int(repeated.sum())} duplicate final run(s) of seeds "
                f"{sorted(set(seeds[repeated]))}: only the first of each counted"
            )
            keep[mine.index[repeated]] = False
    tune = runs[runs["tags.role"] == Role.TUNE]
    repeated = tune.duplicated(["cell", "tuning", "tags.optuna_trial"])
    if repeated.any():
        problems.append(
            f"{int(repeated.sum())} tuning run(s) repeat a trial number of their cell "
            f"(duplicates): only the first of each counted"
        )
        keep[tune.index[repeated]] = False
    return runs[keep].sort_index(), problems
