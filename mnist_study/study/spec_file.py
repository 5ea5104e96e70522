"""A study's spec as text: read from its file (bytes to TOML, its `base` merged in
beneath it, then validated by spec.py), and as the stores record it when the study
starts (a summary line and the resolved spec, and the description the UI shows atop
it), which a resumed spec is compared with: a changed design is refused, more tunings or
seeds extend the study.

A resume is also compared with the study's identity: its numbers are a function of the
spec, the code, the threads per run, the device kind and the data (and the CPU kind), so
a resume on other code, threads, device or data would mix two studies in one table. It
is refused in one line naming what differs, unless the user allows the mix, which is
then recorded and reported. An MLflow experiment that holds no study (made by
`mnist-study train --mlflow`, by hand, or MLflow's own Default) is refused as a study's
home."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

from mnist_study.errors import ConfigError, SpecError, StoresDisagree
from mnist_study.study.spec import StudySettings, StudySpec, design, parse_raw
from mnist_study.tracking.legacy import recorded_spec_text
from mnist_study.tracking.names import IDENTITY_TAG


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


def spec_from_record(text: str, path: Path) -> StudySpec:
    """The spec a study recorded when it started: resolved JSON; from versions before
    the spec tag, the file's TOML text."""
    if text.lstrip().startswith("{"):
        return parse_raw(json.loads(text), path)
    return parse_spec(text, path)


def refuse_changed_study(spec: StudySpec, recorded_text: str | None, where: str) -> str | None:
    """A study resumed under the same name must be the study that was started: a changed
    budget or search space would mix trials of two designs in one table. Raising
    study.tunings or adding study.seeds, and nothing else, extends it: the finished units
    are what a fresh run of the larger spec gives (proposals follow from the tuning's
    seed and its own trials), so they are kept. Returns that extension, said in a line."""
    if not recorded_text:
        return None
    try:
        old = spec_from_record(recorded_text, spec.path)
    except (ConfigError, ValueError):
        return None  # written by an older version of this tool: nothing to compare against
    extension = extended(old.settings, spec.settings)
    changed = [
        label
        for label, a, b in (
            ("[study]", old.settings, spec.settings),
            ("[defaults]", design(old.defaults), design(spec.defaults)),
        )
        if a != b and not (label == "[study]" and extension)
    ]
    if old.settings.tunings == 1 < spec.settings.tunings and "[study]" in changed:
        changed[changed.index("[study]")] = (
            f"[study] with study.tunings 1 -> {spec.settings.tunings}: a study tuned once "
            "names its runs without a tuning index, so it cannot gain tunings"
        )
    old_variants = {v.name: v for v in old.variants}
    changed += [  # a new description only rewords the report: not a change of design
        f"variants.{v.name}"
        for v in spec.variants
        if v.name in old_variants
        and dataclasses.replace(old_variants[v.name], description="")
        != dataclasses.replace(v, description="")
    ]
    added = [v.name for v in spec.variants if v.name not in old_variants]
    removed = sorted(set(old_variants) - {v.name for v in spec.variants})
    changed += [f"added variants.{n}" for n in added] + [f"removed variants.{n}" for n in removed]
    if changed:
        raise SpecError(
            f"{spec.path}: changed since study {spec.name!r} started in {where} "
            f"({', '.join(changed)}); restore the file to resume it (raising study.tunings "
            f"or adding study.seeds alone extends it), or set a new "
            f'name = "..." at its top to start a new study'
        )
    return extension


def extended(old: StudySettings, new: StudySettings) -> str | None:
    """'study.tunings 3 -> 8' (and/or the seeds added) where `new` only raises the
    tunings of a study tuned several times or adds final seeds; else None."""
    same = new.model_copy(update={"tunings": old.tunings, "seeds": old.seeds}) == old
    grows = new.tunings >= old.tunings and set(new.seeds) >= set(old.seeds)
    if not same or not grows or new == old or (old.tunings == 1 < new.tunings):
        return None
    parts = []
    if new.tunings != old.tunings:
        parts.append(f"study.tunings {old.tunings} -> {new.tunings}")
    if set(new.seeds) != set(old.seeds):
        parts.append(f"study.seeds + {sorted(set(new.seeds) - set(old.seeds))}")
    return ", ".join(parts)


ADVICE = {
    "code": "check out a commit with its code ({commit})",
    "threads": "pass the --threads it ran with",
    "device": "set the device it ran on",
    "data": "use the data it ran on",
}


def recorded_study(spec: StudySpec, tags: dict[str, str] | None, where: str) -> str | None:
    """The spec the study's experiment recorded (None when there is no experiment yet);
    refuses an experiment of that name that records no study."""
    if tags is None:
        return None
    recorded = recorded_spec_text(tags)
    if not recorded:
        raise SpecError(
            f"{spec.path}: MLflow experiment {spec.name!r} in {where} exists but holds no "
            f"study (made by `mnist-study train --mlflow`, by hand, or MLflow's Default); "
            f'give the study another name (name = "..." in {spec.path}) or another '
            f"--tracking-uri"
        )
    return recorded


def recorded_identity(tags: dict[str, str] | None) -> dict[str, str]:
    try:
        return json.loads((tags or {}).get(IDENTITY_TAG) or "{}")
    except ValueError:
        return {}


def identity_change(tags: dict[str, str] | None, identity: dict[str, str]) -> str:
    """How `identity` differs from the one the study recorded ('threads 1 -> 2'); empty
    when it does not, or when nothing was recorded (a new study, or one from before).
    The commit is not compared: one that changes no code changes no number."""
    recorded = recorded_identity(tags)
    return "; ".join(
        f"{key} {recorded[key]} -> {value}"
        for key, value in identity.items()
        if key in recorded and recorded[key] != value and key != "commit"
    )


def refuse_other_study(
    spec: StudySpec, tags: dict[str, str] | None, where: str, identity: dict, allowed: bool
) -> str | None:
    """Refuse an experiment that holds no study, another design, or (unless allowed) a
    resume on another identity; returns the spec's extension, if it is one."""
    recorded = recorded_study(spec, tags, where)
    change = identity_change(tags, identity)
    if change and not allowed:
        keys = [part.split(" ", 1)[0] for part in change.split("; ")]
        raise StoresDisagree(
            f"study {spec.name!r} in {where} ran with other {', '.join(keys)} ({change}): "
            f"resuming would mix two studies in one table; "
            f"{ADVICE[keys[0]].format(commit=recorded_identity(tags).get('commit', '?'))}, or pass "
            f"--allow-mixed (the report then says which runs ran on which)"
        )
    return refuse_changed_study(spec, recorded, where)
