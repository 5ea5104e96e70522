"""A study's state, read in one pass over Optuna's record: per tuning, its trials by
state, its final seeds done, running and free, its best trial, and whether it is
finished. The one place that compares trial states to count a study's progress: the
scheduler, the progress line, the time left, `status`, the Slurm watcher, a resume's
line and cell closing all read a Ledger, so they cannot disagree on what is done."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_study.study.spec import Cell, StudySpec, Tuning

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
"""A unit in one of these states is finished for good: it counts, and is never redone."""
TAKEN = (*DONE, TrialState.RUNNING, TrialState.WAITING)
"""A final seed in one of these states is not free to claim."""


@dataclass(frozen=True)
class TuningLedger:
    """One tuning's trials and final seeds as the record holds them now."""

    tuning: Tuning
    trials: tuple[FrozenTrial, ...]
    finals: tuple[FrozenTrial, ...]
    budget: int
    """Trials the spec gives a tuning."""
    seeds: tuple[int, ...]
    """The final seeds the spec asks for."""

    @classmethod
    def read(
        cls, tuning: Tuning, tune: optuna.Study | None, final: optuna.Study | None, spec: StudySpec
    ) -> TuningLedger:
        """From the tuning's Optuna studies: its trials, and its final seeds (None: not
        created yet, a tuning that an extended spec adds before its first run)."""
        s = spec.settings
        return cls(
            tuning,
            tuple(tune.get_trials(deepcopy=False)) if tune else (),
            tuple(final.get_trials(deepcopy=False)) if final else (),
            s.trials,
            s.seeds,
        )

    def _in(self, trials, states) -> list[FrozenTrial]:
        return [t for t in trials if t.state in states]

    @property
    def done_trials(self) -> list[FrozenTrial]:
        return self._in(self.trials, DONE)

    @property
    def running_trials(self) -> list[FrozenTrial]:
        return self._in(self.trials, (TrialState.RUNNING,))

    @property
    def running_finals(self) -> list[FrozenTrial]:
        return self._in(self.finals, (TrialState.RUNNING,))

    @property
    def complete_finals(self) -> list[FrozenTrial]:
        return self._in(self.finals, (TrialState.COMPLETE,))

    @property
    def failed(self) -> int:
        return len(self._in(self.trials + self.finals, (TrialState.FAIL,)))

    def count(self, state: TrialState) -> int:
        """The tuning trials in `state`."""
        return len(self._in(self.trials, (state,)))

    @property
    def best(self) -> FrozenTrial | None:
        """The best complete trial; a tie goes to the earlier slot (trial numbers also
        count failed trials, which depend on crashes)."""
        complete = self._in(self.trials, (TrialState.COMPLETE,))
        key = lambda t: (t.value, -t.user_attrs.get("slot", t.number))  # noqa: E731
        return max(complete, key=key) if complete else None

    @property
    def seeds_done(self) -> set[int]:
        return {t.user_attrs.get("seed") for t in self._in(self.finals, DONE)} & set(self.seeds)

    @property
    def free_seeds(self) -> list[int]:
        """The final seeds no trial holds yet, in the spec's order."""
        taken = {t.user_attrs.get("seed") for t in self._in(self.finals, TAKEN)}
        return [s for s in self.seeds if s not in taken]

    @property
    def units_done(self) -> int:
        return min(self.budget, len(self.done_trials)) + len(self.seeds_done)

    @property
    def units_left(self) -> tuple[int, int]:
        """(trials, final seeds) neither done nor running."""
        active = (*DONE, TrialState.RUNNING)
        trials = max(0, self.budget - len(self._in(self.trials, active)))
        seeds = set(self.seeds) - {t.user_attrs.get("seed") for t in self._in(self.finals, active)}
        return trials, len(seeds)

    @property
    def finished(self) -> bool:
        """All its trials ended, and its final seeds complete (or no trial to seed them)."""
        seeds = {t.user_attrs.get("seed") for t in self.complete_finals}
        tuned = len(self.done_trials) >= self.budget
        return tuned and (self.best is None or seeds >= set(self.seeds))


@dataclass(frozen=True)
class Ledger:
    """Every tuning of a study, in the spec's order."""

    spec: StudySpec
    tunings: dict[str, TuningLedger]

    @classmethod
    def read(
        cls, spec: StudySpec, tune: dict[str, optuna.Study], final: dict[str, optuna.Study]
    ) -> Ledger:
        """From the tunings' Optuna studies (trials, and final seeds), by tuning key; a
        tuning with none is not started."""
        read = TuningLedger.read
        return cls(
            spec, {t.key: read(t, tune.get(t.key), final.get(t.key), spec) for t in spec.tunings}
        )

    def __getitem__(self, tuning: Tuning) -> TuningLedger:
        return self.tunings[tuning.key]

    def progress(self) -> tuple[int, int]:
        """(units done, units in the budget)."""
        s = self.spec.settings
        done = sum(t.units_done for t in self.tunings.values())
        return done, len(self.tunings) * (s.trials + len(s.seeds))

    def rounds(self) -> tuple[int, int, int]:
        """(K, units done in round K + 1, units a round holds), where K is the rounds
        finished: every cell's first K tunings, which `report --tunings K` reads whole."""
        s = self.spec.settings
        finished = 0
        while finished < s.tunings and all(
            t.finished for t in self.tunings.values() if t.tuning.index == finished
        ):
            finished += 1
        following = [t for t in self.tunings.values() if t.tuning.index == finished]
        per_round = len(self.spec.cells) * (s.trials + len(s.seeds))
        return finished, sum(t.units_done for t in following), per_round

    @property
    def failed(self) -> int:
        """Trials and final seeds that failed (each redone, or to be)."""
        return sum(t.failed for t in self.tunings.values())

    def running(self) -> list[tuple[Tuning, bool, FrozenTrial]]:
        """(tuning, whether a final seed, trial) of every unit in progress."""
        return [
            (t.tuning, final, trial)
            for t in self.tunings.values()
            for final, trials in ((False, t.running_trials), (True, t.running_finals))
            for trial in trials
        ]

    def busy_cells(self) -> set[str]:
        """The cells with a unit in progress."""
        return {tuning.cell.key for tuning, _, _ in self.running()}

    def of_cell(self, cell: Cell) -> list[TuningLedger]:
        return [t for t in self.tunings.values() if t.tuning.cell.key == cell.key]

    def cell_finished(self, cell: Cell) -> bool:
        return all(t.finished for t in self.of_cell(cell))
