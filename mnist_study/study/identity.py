"""A study's identity, guarded: its numbers are a function of the spec, the code, the
threads per run, the device kind and the data (and the CPU kind), so a resume on other
code, threads, device or data would mix two studies in one table. Such a resume is
refused in one line naming what differs, unless the user allows the mix, which is then
recorded and reported. An MLflow experiment that holds no study (made by `mnist-study
train --mlflow`, by hand, or MLflow's own Default) is refused as a study's home."""

from __future__ import annotations

import json

from mnist_study.errors import SpecError, StoresDisagree
from mnist_study.study.spec import StudySpec
from mnist_study.study.spec_file import refuse_changed_study
from mnist_study.tracking.legacy import recorded_spec_text
from mnist_study.tracking.names import IDENTITY_TAG

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
