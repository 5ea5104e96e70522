"""The spec a study records in MLflow when it starts (a summary line and the resolved
spec, and the description the UI shows atop it), and a resumed spec compared with it: a
changed design is refused, more tunings or seeds extend the study."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mnist_study.errors import ConfigError, SpecError
from mnist_study.study.spec import StudySettings, StudySpec, design, parse_raw
from mnist_study.study.spec_file import parse_spec


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
