"""A study's spec from its file: bytes to TOML, its `base` merged in beneath it, then
validated whole into the types of spec.py; and the spec as the stores record it when
the study starts (a summary line and the resolved spec, and the description the UI
shows atop it). A resume is compared with that record in record.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

from mnist_study.errors import SpecError
from mnist_study.study.spec import (
    SearchRange,
    SpecTables,
    StudySettings,
    StudySpec,
    Variant,
    VariantTable,
)
from mnist_study.training.config import TrainConfig, validated


def find_spec(given: Path | str) -> Path:
    """The experiment file `given` names: a path, or a study's name (`ablations`) for
    experiments/NAME.toml where there is one, as `report` takes a name."""
    path = Path(given)
    named = Path("experiments") / f"{path}.toml"
    if not path.exists() and not path.suffix and len(path.parts) == 1 and named.is_file():
        return named
    return path


def load_spec(path: Path | str) -> StudySpec:
    """Read and validate a study file (and its base); any problem raises SpecError."""
    return parse_spec(read_spec_text(Path(path)), Path(path))


def parse_spec(text: str, path: Path) -> StudySpec:
    """A spec from its TOML text; a `base` is read relative to `path`'s folder."""
    spec = parse_raw(resolve_base(parse_toml(text, path), path, (path.resolve(),)), path)
    check_recordable(spec)
    return spec


def parse_raw(raw: dict, path: Path) -> StudySpec:
    where = str(path)
    top = validated(SpecTables, where, raw)
    name = top.name or path.stem
    settings = validated(StudySettings, where, top.study, "study.")
    defaults = TrainConfig().replace(f"{where}: defaults", **top.defaults)
    if not top.variants:
        raise SpecError(f"{where}: variants: none defined; add at least one [variants.NAME]")
    check_selection(settings.variants, top.variants, where)
    variants = tuple(
        parse_variant(vname, body, defaults, where)
        for vname, body in top.variants.items()
        if vname in (settings.variants or top.variants)
    )
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
    for v in variants if settings.train_sizes else ():
        if "train_size" in v.changes or "train_size" in v.search:
            raise SpecError(
                f"{where}: variants.{v.name}: sets train_size, which study.train_sizes "
                f"sweeps; remove it from the variant"
            )
        for n in settings.train_sizes:
            defaults.replace(f"{where}: study.train_sizes", **v.changes, train_size=n)


def parse_variant(name: str, body: dict, defaults: TrainConfig, where: str) -> Variant:
    at = f"variants.{name}"
    if not name.replace("_", "").isalnum():
        raise SpecError(f"{where}: {at}: variant names are letters, digits and '_'")
    table = validated(VariantTable, where, body, f"{at}.")
    # Validates every key and type of the variant's changes against TrainConfig.
    cfg = defaults.replace(f"{where}: {at}.set", **table.set)
    fields = TrainConfig.model_fields
    numeric = sorted(k for k, f in fields.items() if f.annotation in (float, int))
    search = {}
    for key, spec in table.search.items():
        key_at = f"{at}.search.{key}"
        if key not in numeric:
            raise SpecError(
                f"{where}: {key_at}: not a numeric config field; searchable: {', '.join(numeric)}"
            )
        if key in table.set:
            raise SpecError(f"{where}: {key_at}: also fixed in {at}.set; choose one")
        search[key] = validated(SearchRange, where, spec, f"{key_at}.")
        for end in ("low", "high"):
            # An integer field is searched over integers; both ends must make a valid
            # config (e.g. dropout < 1).
            if fields[key].annotation is int and type(spec[end]) is not int:
                raise SpecError(f"{where}: {key_at}.{end} = {spec[end]!r}; must be an integer")
            cfg.replace(f"{where}: {key_at}", **{key: spec[end]})
    if not search:
        raise SpecError(
            f"{where}: {at}.search: empty; tune at least lr "
            f"(e.g. search.lr = {{ low = 1e-4, high = 1e-2, log = true }})"
        )
    return Variant(name, dict(table.set), search, table.description)


# MLflow's limits (mlflow.utils.validation): an experiment's tag value, a run's tag value.
EXPERIMENT_TAG_CHARS, RUN_TAG_CHARS = 20_000, 8_000


def check_recordable(spec: StudySpec) -> None:
    """Refuse a spec MLflow could not record whole (its JSON and description go into
    experiment tags, a variant's description onto its parent run), before anything is
    created."""
    for v in spec.variants:
        if len(v.description) > RUN_TAG_CHARS:
            raise SpecError(
                f"{spec.path}: variants.{v.name}.description is {len(v.description):,} "
                f"characters; MLflow keeps at most {RUN_TAG_CHARS:,} on a run: shorten it"
            )
    for what, text in (("description", experiment_description(spec)), ("spec", spec_tag(spec))):
        if len(text) > EXPERIMENT_TAG_CHARS:
            raise SpecError(
                f"{spec.path}: the study's {what} as recorded in MLflow is {len(text):,} "
                f"characters; MLflow keeps at most {EXPERIMENT_TAG_CHARS:,} in an experiment "
                f"tag: shorten the descriptions"
            )


MAX_SPEC_BYTES = 1_000_000  # a study file is a page of TOML; more is a wrong path


def read_spec_text(path: Path) -> str:
    if path.is_dir():
        raise SpecError(f"{path}: is a folder; give an experiment file such as {path}/NAME.toml")
    # A FIFO or a device would be read forever (or until memory runs out): refused unread.
    if path.exists() and not path.is_file():
        raise SpecError(f"{path}: not a regular file; give an experiment file (TOML)")
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(
                f"{path}: {size:,} bytes; an experiment file is at most {MAX_SPEC_BYTES:,}"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(
            f"{path}: no such experiment file (see experiments/ for examples)"
        ) from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")  # an editor's byte-order mark is harmless
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 TOML"
        ) from None


def parse_toml(text: str, path: Path) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Also catches a variant declared twice ("Cannot declare ... twice").
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a study spec") from None


MAX_BASES = 8
"""Files a spec's `base` chain may hold, itself included (the deepest here holds 3):
bounded like every other input, before Python's recursion limit is."""


def resolve_base(raw: dict, path: Path, chain: tuple[Path, ...]) -> dict:
    """`raw` merged onto its base file, recursively. The base's `name` is not inherited:
    a derived spec is a study of its own (its file name, unless it sets `name`)."""
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise SpecError(f"{path}: base = {base!r}; must be the file name of another spec")
    base_path = path.parent / base
    if base_path.resolve() in chain:
        raise SpecError(f"{path}: base = {base!r} leads back to itself")
    if len(chain) >= MAX_BASES:
        raise SpecError(
            f"{path}: base = {base!r} makes a chain of more than {MAX_BASES} files from "
            f"{chain[0].name}; a study builds on a few others: base it on one nearer the root"
        )
    inherited = resolve_base(
        parse_toml(read_spec_text(base_path), base_path), base_path, (*chain, base_path.resolve())
    )
    inherited.pop("name", None)
    return merge(inherited, raw)


def merge(base: dict, changes: dict) -> dict:
    """Tables merge key by key; any other value in `changes` replaces the base's."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def spec_tag(spec: StudySpec) -> str:
    """The experiment's spec tag: a summary line, which is what MLflow's experiment list
    shows of a tag, then the resolved spec (one line of JSON) that a resume is checked
    against."""
    s, sizes = spec.settings, len(spec.sizes)
    return (
        f"{spec.path.name}: {len(spec.variants)} variants x {sizes} size{'s' * (sizes > 1)}; "
        f"{s.trials} trials, {len(s.seeds)} seeds, {s.tunings} tuning{'s' * (s.tunings > 1)} "
        f"per cell (the resolved spec follows as JSON)\n{spec.record()}"
    )


def experiment_description(spec: StudySpec) -> str:
    """What the MLflow UI shows atop the study: its question, budget and how to run it."""
    s, d = spec.settings, spec.defaults
    return (
        f"{spec.resolved.get('description', '')}\n\n"
        f"{len(spec.variants)} variants at {', '.join(f'{n:,}' for n in spec.sizes)} training "
        f"images; each cell tuned by Optuna ({s.trials} trials), then {len(s.seeds)} seeds "
        f"on the test set; {d.length}, batch {d.batch_size}.\n\n"
        f"Spec: `{spec.path}`. Run: `mnist-study run {spec.path} --workers auto`; "
        f"report: `mnist-study report {spec.path}`."
    ).strip()
