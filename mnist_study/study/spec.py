"""Study specs: TOML files in experiments/, read and validated completely (spec_file.py)
before anything runs, into the types here.

base = "ablations.toml"  # optional: start from that file (beside this one); this file
                         # then states only what it changes, key by key
[study]                  # how the study is run (all keys optional)
trials = 8               # Optuna trials per cell, the same for every cell
seeds = [0, 1, 2]        # final runs per cell; only these see the test set
sampler_seed = 0
tunings = 1              # independent tunings per cell (sampler seeds 0, 1, ...), each
                         # with its own final seeds: intervals then carry tuning luck
pruner = "median"        # or "none"
train_sizes = [300, 3000]  # optional sweep: every variant at each size is a cell of its
                           # own (own tuning, own seeds); without it, one cell per variant
variants = ["baseline", "dropout"]  # optional: run only these of the variants defined

[defaults]               # TrainConfig fields for every run of this study
epochs = 5

[variants.dropout]       # one table per variant
set = { }                # the scientific change: TrainConfig fields
search.lr = { low = 1e-4, high = 1e-2, log = true }  # nuisance hyperparameters
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, model_validator

from mnist_study.training.config import SCHEMA, SEED_MAX, TrainConfig

MAX_SEEDS = 1000
MAX_SIZES = 20


def distinct(what: str, kind: type, sort: bool = False) -> BeforeValidator:
    """A TOML list of distinct values of one kind, as a tuple."""

    def check(value: object) -> tuple:
        ok = (
            isinstance(value, list | tuple)
            and value
            and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        )
        if not ok or len(set(value)) != len(value):
            raise ValueError(f"must be a non-empty list of distinct {what}")
        return tuple(sorted(value) if sort else value)

    return BeforeValidator(check)


def seeds_in_range(seeds: tuple[int, ...]) -> tuple[int, ...]:
    if len(seeds) > MAX_SEEDS or not all(0 <= s <= SEED_MAX for s in seeds):
        raise ValueError(f"at most {MAX_SEEDS} seeds, each in [0, {SEED_MAX}]")
    return seeds


def few_sizes(sizes: tuple[int, ...]) -> tuple[int, ...]:
    if len(sizes) > MAX_SIZES:
        raise ValueError(f"at most {MAX_SIZES} sizes")
    return sizes


def study_name(name: str) -> str:
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError("must be letters, digits, '-' or '_'")
    if name == "Default":
        raise ValueError("is MLflow's own experiment, which holds no study; choose another")
    return name


class StudySettings(BaseModel):
    """The [study] table: how the study is run."""

    model_config = SCHEMA

    trials: int = Field(8, ge=1, le=10_000)
    """Optuna trials per variant (COMPLETE + PRUNED); crashed trials are redone."""
    seeds: typing.Annotated[
        tuple[int, ...], distinct("integers", int), AfterValidator(seeds_in_range)
    ] = (0, 1, 2)
    """Seeds of the final runs, which alone are evaluated on the test set."""
    sampler_seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of tuning 0's TPE sampler (tuning r: sampler_seed + r). The k-th trial of a
    tuning is proposed from (that seed, k) and the tuning's first k-1 trials alone, so
    proposals never depend on workers, timing or resumes."""
    tunings: int = Field(1, ge=1, le=100)
    """Independent tunings per cell, each with its own sampler seed and its own final
    seeds: the report's intervals then carry the luck of tuning, not only of seeds."""
    startup_trials: int = Field(4, ge=0, le=10_000)
    """Random trials before TPE models the space; also the pruner's startup."""
    pruner: typing.Literal["median", "none"] = "median"
    """Median pruning on validation accuracy, within a cell's own study only."""
    train_sizes: typing.Annotated[
        tuple[int, ...], distinct("integers", int, sort=True), AfterValidator(few_sizes)
    ] = ()
    """Training-set sizes to sweep: each (variant, size) is tuned and run on its own."""
    variants: typing.Annotated[tuple[str, ...], distinct("variant names", str)] = ()
    """The variants to run, of those defined (empty: all): a follow-up study on a base
    file runs only the comparisons it was declared for."""


class SpecTables(BaseModel):
    """A study file's top level, its base merged in."""

    model_config = SCHEMA

    name: typing.Annotated[str, AfterValidator(study_name)] = ""
    """The study's name in both stores (default: the file's name)."""
    description: str = ""
    study: dict = {}
    defaults: dict = {}
    variants: dict[str, dict] = {}


class VariantTable(BaseModel):
    model_config = SCHEMA

    description: str = ""
    set: dict = {}
    """The scientific change: TrainConfig fields."""
    search: dict[str, dict] = {}
    """Nuisance hyperparameters Optuna tunes for this variant."""


class SearchRange(BaseModel):
    """One nuisance hyperparameter's range: `{ low = L, high = H, log = true }`."""

    model_config = SCHEMA

    low: float
    """The lowest value tried: write { low = L, high = H }."""
    high: float
    """The highest value tried: write { low = L, high = H }."""
    log: bool = False

    @model_validator(mode="after")
    def _an_interval(self) -> SearchRange:
        low, high = self.low, self.high
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"low {low} and high {high} must be finite numbers")
        if not low < high:
            raise ValueError(f"low {low} must be below high {high}")
        if self.log and low <= 0:
            raise ValueError(f"log scale needs low > 0, got {low}")
        return self


@dataclass(frozen=True)
class Variant:
    name: str
    changes: dict[str, object]
    """The TrainConfig fields this variant sets (its scientific hyperparameter)."""
    search: dict[str, SearchRange]
    """Nuisance hyperparameters Optuna tunes for this variant."""
    description: str = ""


@dataclass(frozen=True)
class Cell:
    """A variant at one training-set size: the unit of tuning, with its own tunings and
    final seeds. Without a sweep a study's cells are its variants (train_size None)."""

    variant: Variant
    train_size: int | None = None

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def key(self) -> str:
        """The cell's name in both stores: `dropout`, or `dropout.n300` in a sweep."""
        return self.name if self.train_size is None else f"{self.name}.n{self.train_size}"

    @property
    def changes(self) -> dict[str, object]:
        sized = {} if self.train_size is None else {"train_size": self.train_size}
        return self.variant.changes | sized

    @property
    def search(self) -> dict[str, SearchRange]:
        return self.variant.search

    @property
    def description(self) -> str:
        return self.variant.description


@dataclass(frozen=True)
class Tuning:
    """One tuning of a cell: its own Optuna study, sampler seed and final seeds."""

    cell: Cell
    index: int
    sampler_seed: int
    replicated: bool
    """Whether the study tunes each cell more than once (then names carry the index)."""

    @property
    def key(self) -> str:
        """`dropout.n300`, or `dropout.n300/t1` for the second of several tunings."""
        return f"{self.cell.key}/t{self.index}" if self.replicated else self.cell.key

    @property
    def prefix(self) -> str:
        """Before its names on the cell's parent run: `t1.` for the second of several."""
        return f"t{self.index}." if self.replicated else ""

    @property
    def tuned_params(self) -> list[str]:
        """Its best hyperparameters' names there: `best_lr`, or `t1.best_lr`."""
        return [f"{self.prefix}best_{name}" for name in self.cell.search]


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: Path
    settings: StudySettings
    defaults: TrainConfig
    variants: tuple[Variant, ...] = field(default_factory=tuple)
    resolved: dict = field(default_factory=dict, compare=False)
    """The spec with its base merged in: what MLflow records, what a resume compares."""

    @property
    def sizes(self) -> tuple[int, ...]:
        """The training-set sizes the study trains on: its sweep's, or the defaults' one."""
        return self.settings.train_sizes or (self.defaults.train_size,)

    @property
    def cells(self) -> tuple[Cell, ...]:
        """The units of tuning: each variant, or in a sweep each (size, variant), the
        smallest size first (its comparisons are the ones the sweep is for)."""
        sizes = self.settings.train_sizes or (None,)
        return tuple(Cell(v, n) for n in sizes for v in self.variants)

    @property
    def tunings(self) -> tuple[Tuning, ...]:
        """Every cell's tunings, cell by cell."""
        r = self.settings.tunings
        return tuple(
            Tuning(cell, i, self.settings.sampler_seed + i, r > 1)
            for cell in self.cells
            for i in range(r)
        )

    def record(self) -> str:
        """What the stores keep of this study: the resolved spec with its defaults spelled
        out in full, so that a default changed later in the code is seen on resume."""
        return json.dumps(
            self.resolved | {"defaults": design_params(self.defaults)}, separators=(",", ":")
        )

    def config_for(self, variant: Variant | Cell, params: dict[str, object]) -> TrainConfig:
        return self.defaults.replace(
            f"{self.path}: variants.{variant.name}", **variant.changes, **params
        )


# How a run executes, not what it computes: a different default there is the same study.
EXECUTION_FIELDS = {"device", "cuda_graph", "threads"}


def design_params(cfg: TrainConfig) -> dict[str, object]:
    """The config as a study's design: every field but how it executes."""
    return {k: v for k, v in cfg.as_params().items() if k not in EXECUTION_FIELDS}
