"""Study specs: TOML files in experiments/, validated completely before anything runs.

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

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mnist_study.errors import SpecError
from mnist_study.training.config import SEED_MAX, TrainConfig


@dataclass(frozen=True)
class SearchRange:
    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Variant:
    name: str
    changes: dict[str, object]
    """The TrainConfig fields this variant sets (its scientific hyperparameter)."""
    search: dict[str, SearchRange]
    """Nuisance hyperparameters Optuna tunes for this variant."""
    description: str = ""
    train_size: int | None = None
    """In a sweep, the training-set size of this cell (None: no sweep)."""

    @property
    def key(self) -> str:
        """The cell's name in both stores: `dropout`, or `dropout.n300` in a sweep."""
        return self.name if self.train_size is None else f"{self.name}.n{self.train_size}"


@dataclass(frozen=True)
class Tuning:
    """One tuning of a cell: its own Optuna study, sampler seed and final seeds."""

    cell: Variant
    index: int
    sampler_seed: int
    replicated: bool
    """Whether the study tunes each cell more than once (then names carry the index)."""

    @property
    def key(self) -> str:
        """`dropout.n300`, or `dropout.n300/t1` for the second of several tunings."""
        return f"{self.cell.key}/t{self.index}" if self.replicated else self.cell.key


@dataclass(frozen=True)
class StudySettings:
    trials: int = 8
    """Optuna trials per variant (COMPLETE + PRUNED); crashed trials are redone."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the final runs, which alone are evaluated on the test set."""
    sampler_seed: int = 0
    """Seed of tuning 0's TPE sampler (tuning r: sampler_seed + r). The k-th trial of a
    tuning is proposed from (that seed, k) and the tuning's first k-1 trials alone, so
    proposals never depend on workers, timing or resumes."""
    tunings: int = 1
    """Independent tunings per cell, each with its own sampler seed and its own final
    seeds: the report's intervals then carry the luck of tuning, not only of seeds."""
    startup_trials: int = 4
    """Random trials before TPE models the space; also the pruner's startup."""
    pruner: typing.Literal["median", "none"] = "median"
    """Median pruning on validation accuracy, within a cell's own study only."""
    train_sizes: tuple[int, ...] = ()
    """Training-set sizes to sweep: each (variant, size) is tuned and run on its own."""
    variants: tuple[str, ...] = ()
    """The variants to run, of those defined (empty: all): a follow-up study on a base
    file runs only the comparisons it was declared for."""


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
    def cells(self) -> tuple[Variant, ...]:
        """The units of tuning: each variant, or in a sweep each (size, variant), the
        smallest size first (its comparisons are the ones the sweep is for)."""
        if not self.settings.train_sizes:
            return self.variants
        return tuple(
            dataclasses.replace(v, changes={**v.changes, "train_size": n}, train_size=n)
            for n in self.settings.train_sizes
            for v in self.variants
        )

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
            self.resolved | {"defaults": design(self.defaults)}, separators=(",", ":")
        )

    def config_for(self, variant: Variant, params: dict[str, object]) -> TrainConfig:
        return self.defaults.replace(
            f"{self.path}: variants.{variant.name}", **variant.changes, **params
        )


# How a run executes, not what it computes: a different default there is the same study.
EXECUTION_FIELDS = {"device", "cuda_graph", "threads"}


def design(cfg: TrainConfig) -> dict[str, object]:
    return {k: v for k, v in cfg.as_params().items() if k not in EXECUTION_FIELDS}


SETTING_RANGES = {
    "trials": (1, 10_000),
    "startup_trials": (0, 10_000),
    "sampler_seed": (0, SEED_MAX),
    "tunings": (1, 100),
}
MAX_SEEDS = 1000
MAX_SIZES = 20

TOP_KEYS = {"name", "description", "study", "defaults", "variants"}  # and "base", resolved
VARIANT_KEYS = {"description", "set", "search"}
RANGE_KEYS = {"low", "high", "log"}


def parse_raw(raw: dict, path: Path) -> StudySpec:
    where = str(path)
    unknown(raw, TOP_KEYS, where, "")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise SpecError(f"{where}: name = {name!r}; must be letters, digits, '-' or '_'")
    settings = parse_settings(raw.get("study", {}), where)
    defaults_table = table(raw.get("defaults", {}), where, "defaults")
    defaults = TrainConfig().replace(f"{where}: defaults", **defaults_table)
    variants_table = table(raw.get("variants", {}), where, "variants")
    if not variants_table:
        raise SpecError(f"{where}: variants: none defined; add at least one [variants.NAME]")
    variants = tuple(
        parse_variant(vname, body, defaults, where)
        for vname, body in variants_table.items()
        if vname in (settings.variants or variants_table)
    )
    check_selection(settings.variants, variants_table, where)
    check_sweep(settings, defaults, variants, where)
    return StudySpec(name, path, settings, defaults, variants, raw | {"name": name})


def check_selection(selected: tuple[str, ...], defined: dict, where: str) -> None:
    missing = [n for n in selected if n not in defined]
    if missing:
        raise SpecError(
            f"{where}: study.variants: {', '.join(missing)} not defined; "
            f"defined: {', '.join(defined)}"
        )
    if selected and "baseline" in defined and "baseline" not in selected:
        raise SpecError(
            f"{where}: study.variants: add 'baseline'; every comparison is made against it"
        )


def check_sweep(
    settings: StudySettings, defaults: TrainConfig, variants: tuple[Variant, ...], where: str
) -> None:
    """Each size must make a valid run, and no variant may fix or tune the swept size."""
    if not settings.train_sizes:
        return
    if len(settings.train_sizes) > MAX_SIZES:
        raise SpecError(f"{where}: study.train_sizes: at most {MAX_SIZES} sizes")
    for v in variants:
        if "train_size" in v.changes or "train_size" in v.search:
            raise SpecError(
                f"{where}: variants.{v.name}: sets train_size, which study.train_sizes "
                f"sweeps; remove it from the variant"
            )
        for n in settings.train_sizes:
            defaults.replace(f"{where}: study.train_sizes", **v.changes, train_size=n)


def table(value: object, where: str, key: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: {key} must be a table, got {type(value).__name__}")
    return value


def unknown(raw: dict, allowed: set[str], where: str, prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            raise SpecError(
                f"{where}: unknown key '{prefix}{key}'; allowed: {', '.join(sorted(allowed))}"
            )


def parse_settings(raw: object, where: str) -> StudySettings:
    raw = table(raw, where, "study")
    hints = typing.get_type_hints(StudySettings)
    unknown(raw, set(hints), where, "study.")
    values = {}
    for key, value in raw.items():
        if key in ("seeds", "train_sizes", "variants"):
            item, what = (str, "variant names") if key == "variants" else (int, "integers")
            ok = (
                isinstance(value, list)
                and value
                and all(isinstance(s, item) and not isinstance(s, bool) for s in value)
            )
            if not ok or len(set(value)) != len(value):
                raise SpecError(
                    f"{where}: study.{key} = {value!r}; must be a non-empty list of distinct {what}"
                )
            values[key] = tuple(sorted(value)) if key == "train_sizes" else tuple(value)
            continue
        hint = hints[key]
        if typing.get_origin(hint) is typing.Literal:
            if value not in typing.get_args(hint):
                raise SpecError(
                    f"{where}: study.{key} = {value!r}; must be one of "
                    f"{', '.join(map(repr, typing.get_args(hint)))}"
                )
        elif not isinstance(value, int) or isinstance(value, bool):
            raise SpecError(f"{where}: study.{key} = {value!r}; must be an integer")
        values[key] = value
    settings = StudySettings(**values)
    for key, (low, high) in SETTING_RANGES.items():
        value = getattr(settings, key)
        if not low <= value <= high:
            raise SpecError(f"{where}: study.{key} = {value}; must be in [{low}, {high}]")
    bad_seeds = [s for s in settings.seeds if not 0 <= s <= SEED_MAX]
    if bad_seeds or len(settings.seeds) > MAX_SEEDS:
        raise SpecError(
            f"{where}: study.seeds = {list(settings.seeds)!r}; at most {MAX_SEEDS} seeds, "
            f"each in [0, {SEED_MAX}]"
        )
    return settings


def parse_variant(name: str, body: object, defaults: TrainConfig, where: str) -> Variant:
    at = f"variants.{name}"
    if not name.replace("_", "").isalnum():
        raise SpecError(f"{where}: {at}: variant names are letters, digits and '_'")
    body = table(body, where, at)
    unknown(body, VARIANT_KEYS, where, f"{at}.")
    changes = table(body.get("set", {}), where, f"{at}.set")
    # Validates every key and type of the variant's changes against TrainConfig.
    cfg = defaults.replace(f"{where}: {at}.set", **changes)
    search = {}
    hints = typing.get_type_hints(TrainConfig)
    for key, spec in table(body.get("search", {}), where, f"{at}.search").items():
        key_at = f"{at}.search.{key}"
        if hints.get(key) not in (float, int):
            numeric = sorted(k for k, h in hints.items() if h in (float, int))
            raise SpecError(
                f"{where}: {key_at}: not a numeric config field; searchable: {', '.join(numeric)}"
            )
        if key in changes:
            raise SpecError(f"{where}: {key_at}: also fixed in {at}.set; choose one")
        spec = table(spec, where, key_at)
        unknown(spec, RANGE_KEYS, where, f"{key_at}.")
        search[key] = parse_range(spec, hints[key] is int, where, key_at)
        # Both ends must make a valid config (e.g. dropout < 1).
        for end in (search[key].low, search[key].high):
            cfg.replace(f"{where}: {key_at}", **{key: end})
    if not search:
        raise SpecError(
            f"{where}: {at}.search: empty; tune at least lr "
            f"(e.g. search.lr = {{ low = 1e-4, high = 1e-2, log = true }})"
        )
    return Variant(name, dict(changes), search, str(body.get("description", "")))


def parse_range(spec: dict, integer: bool, where: str, at: str) -> SearchRange:
    for end in ("low", "high"):
        if end not in spec:
            raise SpecError(f"{where}: {at}: missing {end!r}; write {{ low = L, high = H }}")
        value = spec[end]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (integer and not isinstance(value, int))
        ):
            kind = "an integer" if integer else "a number"
            raise SpecError(f"{where}: {at}.{end} = {value!r}; must be {kind}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"{where}: {at}.log = {log!r}; must be true or false")
    low, high = spec["low"], spec["high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        raise SpecError(f"{where}: {at}: low {low} and high {high} must be finite numbers")
    if not low < high:
        raise SpecError(f"{where}: {at}: low {low} must be below high {high}")
    if log and low <= 0:
        raise SpecError(f"{where}: {at}: log scale needs low > 0, got {low}")
    return SearchRange(low, high, log, integer)
