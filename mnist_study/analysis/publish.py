"""Writing a study's report out: reports/<study>/ (Markdown, CSV, figures), the figures
on the variant parent runs and a `report` run in MLflow, and a study's section of a
Markdown page (docs/STUDY.md)."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pandas as pd

from mnist_study.analysis.ablation import ablation_section
from mnist_study.analysis.collect import StudyData
from mnist_study.analysis.raw_runs import data_files, read_raw, read_study, write_raw
from mnist_study.analysis.sweep import sweep_section
from mnist_study.errors import PageRefused, SpecError
from mnist_study.files import write_atomic
from mnist_study.store_paths import DEFAULT_TRACKING_URI, check_writable_folder, store_flags
from mnist_study.study.spec import StudySpec
from mnist_study.tracking.legacy import recorded_command
from mnist_study.tracking.names import Role
from mnist_study.tracking.report_run import log_figures, log_report_run


def markers(study: str) -> tuple[str, str]:
    """The Markdown comments that enclose a study's section in a page (one pair per study)."""
    return f"<!-- results:{study}:start -->", f"<!-- results:{study}:end -->"


def seed_ranges(seeds: tuple[int, ...]) -> str:
    """`0–4, 7`: consecutive seeds as ranges."""
    runs: list[list[int]] = []
    for s in sorted(seeds):
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def report_command(
    study: str, tracking_uri: str, storage: str | None, raw_args: list[str] | None = None
) -> str:
    """The `mnist-study report` command for these stores (defaults left out), or with
    `raw_args` (--runs CSV) for the raw runs alone."""
    flags = raw_args or store_flags(tracking_uri, storage)
    return shlex.join(["mnist-study", "report", study, *flags])


def short_commit(commit: str) -> str:
    """12 hex digits, and `-dirty` kept: a run from an edited checkout is not its commit's."""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def provenance_line(data: StudyData, report: str = "") -> str:
    runs = data.runs
    if runs.empty:
        return f"Study `{data.name}`: no runs yet."
    children = runs[runs["tags.role"].isin([Role.TUNE, Role.FINAL])]
    start, end = children.start_time.min(), children.end_time.max()
    commits = children["tags.git_commit"].value_counts()
    commits.index = [short_commit(c) for c in commits.index]
    commit = (
        f"commit `{commits.index[0]}`"
        if len(commits) == 1
        else "commits " + ", ".join(f"`{c}` ({n} run{'s' * (n > 1)})" for c, n in commits.items())
    )
    cpu, _ = each_value(children, "tags.cpu")  # a study resumed on another machine: both
    workers = children["tags.workers"].mode().iat[0] if "tags.workers" in children else "?"
    at_once = peak_overlap(children.start_time, children.end_time)
    threads, mixed = each_value(children, "tags.threads")
    threads = f"thread(s) per run {threads}" if mixed else f"{threads} thread(s) per run"
    device, _ = each_value(children, "tags.device")
    device = "" if device in ("cpu", "?") else f", device {device}"
    budget = ""
    if data.spec:
        s, d = data.spec.settings, data.spec.defaults
        sizes = (
            f"{', '.join(f'{n:,}' for n in s.train_sizes)} train images (one cell each)"
            if s.train_sizes
            else f"{d.train_size:,} train images"
        )
        each = f"{s.trials} trials + {len(s.seeds)} seeds ({seed_ranges(s.seeds)})"
        if s.tunings > 1:
            sampler_seeds = seed_ranges(tuple(s.sampler_seed + r for r in range(s.tunings)))
            each = f"{s.tunings} tunings (sampler seeds {sampler_seeds}) x ({each})"
        budget = (
            f"{each} per "
            f"{'cell' if s.train_sizes else 'variant'}, {d.length}, batch {d.batch_size}, "
            f"{sizes}, {d.val_size:,} validation images, {d.precision}; "
        )
    span = (end - start).total_seconds() / 60 if pd.notna(end) else math.nan
    busy = busy_minutes(children.start_time, children.end_time)
    wall = f"{busy:.0f} min wall time"
    if span - busy > 1:
        wall += f" with runs in progress, {span:.0f} min including pauses between resumes"
    until = "%H:%M" if pd.notna(end) and end.date() == start.date() else "%Y-%m-%d %H:%M"
    stage = f"; read here: {data.stage}" if data.stage else ""
    if data.extended:
        stage += f"; extended after it started: {data.extended}"
    if data.mixed:
        stage += f"; resumed mixed (--allow-mixed): {data.mixed}"
    if data.restored:
        stage += f"; {data.restored}"
    return (
        f"Study `{data.name}` ({budget}{len(children)} runs{stage}), {commit}, "
        f"{cpu}{device}, up to {at_once} run(s) at once, {threads}; runs from "
        f"{start:%Y-%m-%d %H:%M} to {end:{until}} UTC ({wall}). "
        f"{recorded_command(children, data.name, workers)}, then "
        f"`{report or report_command(data.name, DEFAULT_TRACKING_URI, None)}`."
    )


def each_value(runs: pd.DataFrame, column: str) -> tuple[str, bool]:
    """A tag's one value over the runs, or each value with its count where they differ
    (a study resumed mixed), and whether they do: ('1', False), or ('1 (40 runs),
    2 (8 runs)', True)."""
    if column not in runs:
        return "?", False
    counts = runs[column].value_counts()
    if len(counts) == 1:
        return str(counts.index[0]), False
    return ", ".join(f"{value} ({n} runs)" for value, n in counts.items()), len(counts) > 1


def peak_overlap(starts: pd.Series, ends: pd.Series) -> int:
    """The most runs in progress at one moment: how many processes worked on the study
    at once, whichever commands started them (a run still in progress counts as open
    to the last time recorded)."""
    ends = ends.fillna(pd.concat([starts, ends]).max() + pd.Timedelta(seconds=1))
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends])  # ends sort first
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def busy_minutes(starts: pd.Series, ends: pd.Series) -> float:
    """Minutes during which at least one run was in progress: the study's wall time
    without the gaps of an interrupted study waiting to be resumed."""
    total, reach = 0.0, None
    done = ends.notna()  # runs still in progress have no end yet
    for start, end in sorted(zip(starts[done], ends[done], strict=True)):
        if reach is None or start > reach:
            total += (end - start).total_seconds()
            reach = end
        elif end > reach:
            total += (end - reach).total_seconds()
            reach = end
    return total / 60


def replace_section(page: Path, body: str, study: str) -> bool:
    """Swap the text between the study's markers (a new page is made with them); True
    if the file changed."""
    start, end = markers(study)
    text = page.read_text() if page.exists() else f"# Study `{study}`\n\n{start}\n{end}\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SpecError(f"{page}: no {start} ... {end} markers to replace")
    new = pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text)
    if new != text or not page.exists():
        write_atomic(page, new)
    return new != text


def brief(report: str) -> str:
    """What a terminal needs after a study: per variant its test accuracy and difference
    from the baseline, the verdicts and the checks, in columns that fit a terminal (the
    rest of each table, the figures, legends and provenance are in the files it names)."""
    out = []
    for block in report.split("\n\n"):
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("| variant |"):
            rows = [cells(line) for line in lines if not line.startswith("|---")]
            keep = [i for i, name in enumerate(rows[0]) if brief_column(name)]
            out.append(aligned([[row[i] for i in keep] for row in rows]))
        elif lines and lines[0].startswith(("#", "Resolved", "**Checks**", "**Partial**")):
            out.append(block.strip())
    return "\n\n".join(out)


def brief_column(name: str) -> bool:
    return name in ("variant", "n") or name.startswith(("test acc", "Δ test", "p (Holm)"))


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def check_places(out_root: Path, study: str, page: Path | None) -> None:
    """Every place the report writes, tried before it reads a run: a refusal after
    minutes of reading would be one too late."""
    check_writable_folder(out_root / study / "results.md", "--out")
    if page is not None:
        check_writable_folder(page, "--page")
        check_writable_folder(data_files(page, study)[0], "--page's data")


def figure_links(pngs: dict[str, Path], out: Path, page: Path | None, study: str) -> str:
    """The figures' Markdown links; a page's figures are its evidence, copied beside it
    (figures/<study>/, rewritten only where they changed) to be committed with it."""
    figure_dir = out
    if page is not None:
        figure_dir = page.parent / "figures" / study
        figure_dir.mkdir(parents=True, exist_ok=True)
        for png in pngs.values():
            target = figure_dir / png.name
            if not target.exists() or target.read_bytes() != png.read_bytes():
                write_atomic(target, png.read_bytes())
    base = page.parent if page is not None else out
    rel = {k: (figure_dir / p.name).relative_to(base) for k, p in pngs.items()}
    return "\n\n".join(f"![{k}]({rel[k].as_posix()})" for k in pngs)


def raw_runs_line(page: Path, study: str, asked_as: str, tunings: int | None) -> str:
    """The page's line naming its raw runs and the command that rebuilds it from them."""
    runs_csv, curves_csv = data_files(page, study)
    runs, curves = (f.relative_to(page.parent).as_posix() for f in (runs_csv, curves_csv))
    return (
        f"Raw runs: [{runs}]({runs}) (one row per tuning trial and final seed: "
        f"hyperparameters, accuracies, steps, seconds, commit, CPU) and [{curves}]({curves}) "
        f"(final runs' curves); `mnist-study report {asked_as} --runs {runs_csv.as_posix()}"
        f"{f' --tunings {tunings}' if tunings else ''}` rebuilds this section from them alone."
    )


def write_report(
    tracking_uri: str,
    study: str,
    out_root: Path,
    page: Path | None = None,
    storage: str | None = None,
    tunings: int | None = None,
    partial: bool = False,
    asked_as: str | None = None,
    raw: tuple[Path, StudySpec] | None = None,
) -> str:
    """Write reports/<study>/ (results.md, CSV, figures), log them to MLflow, and (with
    `page`) replace the study's section in that page, its raw runs beside it; returns it.
    With `tunings`, a stage: every cell's first `tunings` tunings alone. A page is
    published from a complete study only, unless `partial` (then its header says so);
    otherwise PageRefused is raised before anything is written. `asked_as`: the study
    as the command named it (its spec file), for the command the header repeats. `raw`
    (a runs CSV a page published, and the study's spec): the report from that file alone,
    with no store read or written."""
    if raw is not None:
        data = read_raw(raw[0], raw[1], tunings)
    else:  # the stores
        data = read_study(tracking_uri, study, storage, tunings)
    done, planned = data.progress()
    if page is not None and done < planned and not partial:
        raise PageRefused(
            f"{page} left as it was: study {study!r} has {done} of its {planned} runs "
            f"finished; run it to the end, or report without --page (reports/ alone), or "
            f"pass --partial to publish it marked partial"
        )
    out = out_root / study
    out.mkdir(parents=True, exist_ok=True)
    raw_args = [] if raw is None else ["--runs", str(raw[0])]
    report = report_command(asked_as or study, tracking_uri, storage, raw_args)
    report += f" --tunings {tunings}" if data.stage else ""
    partial_line = f"**Partial**: {done} of {planned} runs finished; any verdict may change."
    lines = [partial_line] * (done < planned) + [provenance_line(data, report), ""]
    sweep = data.spec is not None and data.spec.settings.train_sizes
    section = sweep_section if sweep else ablation_section
    body, pngs, found = section(data, out) if data.variants else ([], {}, list(data.problems))
    lines += body
    if pngs and raw is None:
        parents = data.runs[data.runs["tags.role"] == Role.VARIANT]
        log_figures(tracking_uri, list(parents.run_id), list(pngs.values()))
    lines += ["", "**Checks**: " + ("none raised." if not found else "")]
    lines += [f"- {c}" for c in found]
    body = "\n".join(lines)
    if pngs:
        body += "\n\n" + figure_links(pngs, out, page, study)
    if page is not None and raw is None and not data.runs.empty:
        body += "\n\n" + raw_runs_line(page, study, asked_as or study, data.stage and tunings)
    write_atomic(out / "results.md", f"# Study `{study}`\n\n{body}\n")
    if raw is None and (data.spec is not None or not data.runs.empty):
        log_report_run(tracking_uri, study, out, body, report)
    if page is not None:
        if raw is None and not data.runs.empty:
            write_raw(data, tracking_uri, page)
        replace_section(page, body, study)
    return body
