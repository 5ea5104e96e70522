"""What a study is, as its MLflow experiment records it when it starts: the resolved
spec (spec_file.spec_tag), and the identity of the code, threads per run, device kind
and data its numbers are a function of (with the CPU kind, which each run's `cpu` tag
names); and the extensions and mixes accepted since. A resume is compared with that
record here and nowhere else (check_resume): a changed design is refused, more tunings
or seeds extend the study, and other code, threads, device or data would mix two
studies in one table, so it is refused in one line naming what differs unless the user
allows the mix, which is then recorded and reported. An MLflow experiment that holds no
study (made by `mnist-study train --mlflow`, by hand, or MLflow's own Default) is
refused as a study's home."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnist_study.errors import ConfigError, SpecError, StoresDisagree
from mnist_study.study.spec import StudySettings, StudySpec, design_params
from mnist_study.study.spec_file import experiment_description, parse_raw, parse_spec, spec_tag
from mnist_study.tracking.legacy import recorded_spec_text
from mnist_study.tracking.names import (
    EXTENDED_TAG,
    IDENTITY_TAG,
    MIXED_TAG,
    NOTE_TAG,
    SPEC_TAG,
)
from mnist_study.tracking.runs import PACKAGE_REPO, git, git_commit
from mnist_study.training.config import TrainConfig
from mnist_study.training.mnist_data import checksums
from mnist_study.training.train import resolve_device, thread_count

# The layers above study/ (`make lint` keeps study/ and below from importing them) read
# stores and print; they make no number, so an edit of the report is no other code.
NOT_UNIT_CODE = ("mnist_study/analysis/", "mnist_study/cli.py", "mnist_study/commands.py")


@functools.cache
def code_version(repo: Path = PACKAGE_REPO) -> str:
    """The code a study's units run: a hash of the git blobs of mnist_study/ at HEAD but
    NOT_UNIT_CODE, and for an edited one `+` a hash of its diff, so that two edits of one
    commit are two versions while a commit that changes only docs, tests or the report
    is the same code."""
    try:
        listing = git("ls-tree", "-r", "HEAD", "--", "mnist_study", repo=repo)
        paths = ["mnist_study", *(f":(exclude){path}" for path in NOT_UNIT_CODE)]
        diff = git("diff", "HEAD", "--binary", "--", *paths, repo=repo)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    # ls-tree takes no :(exclude) pathspec, so its listing is filtered here.
    kept = [
        line for line in listing.splitlines() if not line.split("\t")[1].startswith(NOT_UNIT_CODE)
    ]
    tree = hashlib.sha1("\n".join(kept).encode()).hexdigest()
    return f"{tree}+{hashlib.sha256(diff.encode()).hexdigest()[:12]}" if diff else tree


def study_identity(cfg: TrainConfig) -> dict[str, str]:
    """What a study's numbers are a function of besides its spec and the CPU kind: the
    code, the threads per run, the device kind and the data (its files' checksums); and
    the commit it started on, which says where that code is."""
    data = hashlib.sha256(",".join(sorted(checksums().values())).encode()).hexdigest()[:12]
    return {
        "code": code_version(),
        "threads": str(thread_count(cfg)),
        "device": resolve_device(cfg).type,
        "data": data,
        "commit": git_commit(),
    }


def spec_from_record(text: str, path: Path) -> StudySpec:
    """The spec a study recorded when it started: resolved JSON; from versions before
    the spec tag, the file's TOML text."""
    if text.lstrip().startswith("{"):
        return parse_raw(json.loads(text), path)
    return parse_spec(text, path)


def refuse_changed_study(spec: StudySpec, old: StudySpec, where: str) -> str | None:
    """A study resumed under the same name must be the study that was started: a changed
    budget or search space would mix trials of two designs in one table. Raising
    study.tunings or adding study.seeds, and nothing else, extends it: the finished units
    are what a fresh run of the larger spec gives (proposals follow from the tuning's
    seed and its own trials), so they are kept. Returns that extension, said in a line."""
    extension = extended(old.settings, spec.settings)
    changed = [
        label
        for label, a, b in (
            ("[study]", old.settings, spec.settings),
            ("[defaults]", design_params(old.defaults), design_params(spec.defaults)),
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


def changed_code(commit: str, repo: Path = PACKAGE_REPO) -> list[str]:
    """The files of unit code this checkout has changed since `commit` (committed or
    not); empty where git cannot tell (no such commit here, no git)."""
    paths = ["mnist_study", *(f":(exclude){path}" for path in NOT_UNIT_CODE)]
    try:
        return git("diff", "--name-only", commit.removesuffix("-dirty"), "--", *paths,
                   repo=repo).split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return []


def worded(change: str, commit: str) -> str:
    """A change of identity as a reader can act on it: a change of code as the commit the
    study started at, whether this checkout's code is another commit's or an edit of
    one, and the files that differ (the hashes are in the experiment's identity tag)."""
    parts = []
    for part in change.split("; "):
        if part.startswith("code "):
            now = "edited code" if "+" in part.rsplit(" -> ", 1)[1] else "another commit's code"
            files = [f.removeprefix("mnist_study/") for f in changed_code(commit)]
            more = f" and {len(files) - 3} more" if len(files) > 3 else ""
            what = f", changed: {', '.join(files[:3])}{more}" if files else ""
            part = f"started at commit {commit[:12]}, this checkout runs {now}{what}"
        parts.append(part)
    return "; ".join(parts)


def recorded_identity(tags: dict[str, str]) -> dict[str, str]:
    """The identity an experiment records; none where its tag is missing or not one
    (an experiment from before identities, or a tag edited by hand)."""
    try:
        found = json.loads(tags.get(IDENTITY_TAG) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def identity_change(recorded: dict[str, str], identity: dict[str, str]) -> str:
    """How `identity` differs from the `recorded` one ('threads 1 -> 2'); empty when it
    does not, or when nothing was recorded (a study from before identities). The commit
    is not compared: one that changes no code changes no number."""
    return "; ".join(
        f"{key} {recorded[key]} -> {value}"
        for key, value in identity.items()
        if key in recorded and recorded[key] != value and key != "commit"
    )


class NoStudy(SpecError):
    """An MLflow experiment whose tags record no study (made by `mnist-study train
    --mlflow`, by hand, by another tool, or MLflow's Default); says why."""


@dataclass(frozen=True)
class Resume:
    """What a resume of a recorded study is: an extension of its spec ('study.tunings 3
    -> 8'), and the mix of identities allowed ('threads 1 -> 2'); empty where not."""

    extension: str = ""
    mixed: str = ""
    finished_on: str = ""
    """Where a finished study ran on another identity ('code ... -> ...'): nothing is left
    to run, so nothing would mix, and a resume only says it is complete."""


@dataclass(frozen=True)
class StudyRecord:
    """A study as its experiment records it, or as a run would record it now."""

    spec: StudySpec
    identity: dict[str, str]
    extensions: str = ""
    """Each extension accepted since it started ('study.tunings 3 -> 8')."""
    mixes: str = ""
    """Each mix of identities a resume was allowed (--allow-mixed: 'threads 1 -> 2')."""

    @classmethod
    def from_tags(cls, tags: dict[str, str], name: str) -> StudyRecord:
        """The study an experiment's `tags` record (named `name`); NoStudy, saying why,
        where they record none. Never assumes a tag is there."""
        text = recorded_spec_text(tags)
        if not text:
            raise NoStudy("it records no spec")
        try:
            spec = spec_from_record(text, Path(f"{name}.toml"))
        except (ConfigError, ValueError) as exc:
            raise NoStudy(f"its recorded spec does not read ({exc})") from None
        return cls(
            spec, recorded_identity(tags), tags.get(EXTENDED_TAG, ""), tags.get(MIXED_TAG, "")
        )

    def to_tags(self) -> dict[str, str]:
        """The experiment tags that record it: description, spec and identity."""
        return {
            NOTE_TAG: experiment_description(self.spec),
            SPEC_TAG: spec_tag(self.spec),
            IDENTITY_TAG: json.dumps(self.identity, sort_keys=True) if self.identity else "",
        }

    def check_resume(
        self,
        tags: dict[str, str] | None,
        where: str,
        allowed: bool,
        finished: Callable[[], bool] = lambda: False,
    ) -> Resume:
        """Compare this study with the one an experiment's `tags` record (None: no such
        experiment yet, nothing to compare): refuse an experiment that holds no study,
        another design, or (unless `allowed`, or the recorded study has `finished`: no
        unit left to run) another identity."""
        if tags is None:
            return Resume()
        try:
            recorded = StudyRecord.from_tags(tags, self.spec.name)
        except NoStudy as exc:
            raise SpecError(
                f"{self.spec.path}: MLflow experiment {self.spec.name!r} in {where} exists "
                f"but holds no study ({exc}: made by `mnist-study train --mlflow`, by hand, "
                f'or MLflow\'s Default); give the study another name (name = "..." in '
                f"{self.spec.path}) or another --tracking-uri"
            ) from None
        change = identity_change(recorded.identity, self.identity)
        extension = refuse_changed_study(self.spec, recorded.spec, where) or ""
        commit = recorded.identity.get("commit", "?")
        if change and not allowed and not extension and finished():
            return Resume(finished_on=worded(change, commit))
        if change and not allowed:
            keys = [part.split(" ", 1)[0] for part in change.split("; ")]
            raise StoresDisagree(
                f"study {self.spec.name!r} ran with other {', '.join(keys)} "
                f"({worded(change, commit)}): resuming would mix two studies. Its report "
                f"needs none of this: mnist-study report {self.spec.path}. To resume: "
                f"{ADVICE[keys[0]].format(commit=commit[:12])}, pass --allow-mixed (the "
                f"report then says which runs ran on which), or use another store "
                f"(--tracking-uri, --storage)"
            )
        return Resume(extension, change)

    def experiment_tags(self, tags: dict[str, str] | None, resume: Resume) -> dict[str, str]:
        """The tags to write on the experiment: all of them on a new one; its identity on
        a resumed one, and the larger spec where the resume extends it."""
        mine = self.to_tags()
        if tags is not None and not resume.extension:
            mine = {IDENTITY_TAG: mine[IDENTITY_TAG]}
        return mine

    @staticmethod
    def appended(resume: Resume) -> dict[str, str]:
        """What a resume adds to the experiment's record of extensions and mixes."""
        return {EXTENDED_TAG: resume.extension, MIXED_TAG: resume.mixed}
