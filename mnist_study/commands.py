"""What each `mnist-study` command does, given its parsed arguments; each imports what it
needs when it runs, so that `--help` and argument errors cost no torch import."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import typing
from pathlib import Path

from mnist_study.errors import ConfigError, port_taken
from mnist_study.store_paths import DEFAULT_TRACKING_URI
from mnist_study.training.config import TrainConfig


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    changes = {k: getattr(args, k) for k in typing.get_type_hints(TrainConfig)}
    return TrainConfig().replace(
        "command line", **{k: v for k, v in changes.items() if v is not None}
    )


def cmd_data(args: argparse.Namespace) -> int:
    from mnist_study.training.mnist_data import fetch, raw_dir

    source = fetch(args.data_root)
    print(f"MNIST ready in {raw_dir(args.data_root)} ({source}; checksums verified)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mnist_study.training.mnist_data import load_splits
    from mnist_study.training.train import check_device

    base = config_from_args(args)
    check_device(base, "command line")
    seeds = args.seeds if args.seeds else [base.seed]
    for seed in seeds:
        base.replace("--seeds", seed=seed)
    splits = load_splits(args.data_root, base)
    tracker = None
    if args.mlflow:
        from mnist_study.tracking.runs import Tracker
        from mnist_study.tracking.store import check_tracking_uri, experiment_store

        check_tracking_uri(args.tracking_uri)
        with experiment_store(args.tracking_uri) as store:
            tracker = Tracker(args.tracking_uri, store.open(args.mlflow))
    finals = [train_seed(base.replace(seed=seed), splits, args.test, tracker) for seed in seeds]
    if len(seeds) > 1:
        keys = ["train_acc", "val_acc"] + (["test_acc"] if args.test else [])
        summary = ", ".join(
            f"{k} {statistics.mean(f[k] for f in finals):.4f} "
            f"± {statistics.stdev(f[k] for f in finals):.4f}"
            for k in keys
        )
        print(f"{len(seeds)} seeds (mean ± sd): {summary}")
    return 0


def train_seed(cfg: TrainConfig, splits, test: bool, tracker) -> dict[str, float]:
    """One run of `train`: a line per evaluation point, optionally mirrored to MLflow."""
    from mnist_study.tracking.names import Role
    from mnist_study.tracking.tracked_run import TrackedRun, train_tracked

    print(
        f"seed {cfg.seed}: {len(splits.train_x):,} train / {len(splits.val_x):,} val images, "
        + cfg.length
        + f", batch {cfg.batch_size}, {cfg.precision}"
    )
    run = TrackedRun()
    if tracker is not None:
        name, tags = f"train/seed-{cfg.seed}", {"role": Role.TRAIN}
        run = TrackedRun(tracker, tracker.create_run(name, cfg, tags, test, "mnist-study train"))
    final = train_tracked(cfg, splits, run, test)
    if test:
        print(f"  test acc {final['test_acc']:.4f} loss {final['test_loss']:.4f}")
    return final


def cmd_bench(args: argparse.Namespace) -> int:
    from mnist_study.store_paths import check_writable_folder
    from mnist_study.study.spec_file import load_spec
    from mnist_study.training.bench import run_bench

    # Refused before minutes of measuring, not after.
    for flag, value in (("--steps", args.steps), ("--rounds", args.rounds)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if args.json:
        check_writable_folder(args.json, "--json")
    if args.study_workers:
        load_spec(args.study_workers)
    run_bench(
        args.data_root, args.steps, args.rounds, args.json, args.study_workers, args.processes
    )
    return 0


def cmd_precision(args: argparse.Namespace) -> int:
    import json

    from mnist_study.analysis.precision import compare_precisions
    from mnist_study.files import write_atomic

    if args.seeds < 2 or not 0 < args.margin < 100:
        raise ConfigError("--seeds must be >= 2 and --margin in (0, 100) points")
    if args.json:
        from mnist_study.store_paths import check_writable_folder

        check_writable_folder(args.json, "--json")
    result = compare_precisions(args.data_root, args.seeds, args.margin / 100)
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mnist_study.analysis.raw_runs import HYPERPARAMETERS, read_raw
    from mnist_study.errors import StudyIncomplete, WorkerRefused
    from mnist_study.study.optuna_storage import optuna_storage
    from mnist_study.study.restore import Published, plan_restore
    from mnist_study.study.runner import RunOptions, run_study
    from mnist_study.study.signals import Interrupted
    from mnist_study.study.spec_file import find_spec, load_spec

    args.spec = find_spec(args.spec)
    spec = load_spec(args.spec)
    optuna_storage(args.storage)  # refuses an unsupported address
    opts = RunOptions.from_args(args, spec)
    restoring = None
    if args.restore:  # refused here, before any store is opened, unless the report reads it
        read_raw(args.restore, spec)  # and it holds runs of this spec's design
        restoring = plan_restore(spec, Published.read(args.restore, HYPERPARAMETERS))
    print(opts.headline(spec), flush=True)
    try:
        run_study(spec, opts, restoring)
    except KeyboardInterrupt as exc:
        print(
            f"interrupted ({exc or 'SIGINT'}): finished trials are kept, those in progress "
            f"are marked FAIL; run the same command again to resume",
            file=sys.stderr,
        )
        return exc.exit_code if isinstance(exc, Interrupted) else 130
    except StudyIncomplete as exc:
        print(f"mnist-study: {exc}", file=sys.stderr)
        return 1
    except WorkerRefused:  # the worker said why, in one line
        return 2
    me = invoked_as()
    if opts.detach:
        status = shlex.join([me, "status", str(args.spec), *opts.store_args()])
        print(f"detached: follow with `{status}`; the same run command attaches again")
        return 0
    report = shlex.join([me, "report", str(args.spec), *opts.store_args()])
    ui = shlex.join([me, "ui", "--tracking-uri", args.tracking_uri])
    ui = "make ui" if args.tracking_uri == DEFAULT_TRACKING_URI else ui
    # Under make (MAKELEVEL set) the target's report follows, so its command is not said.
    then = "" if os.environ.get("MAKELEVEL") else f"Report: {report}   "
    print(
        f"study {spec.name!r} complete in MLflow {args.tracking_uri} and Optuna "
        f"{args.storage}. {then}Browse: {ui}"
    )
    return 0


def invoked_as() -> str:
    """mnist-study as this shell can run it again: by name where PATH finds this one,
    else the venv's script by its path from here (`.venv/bin/mnist-study`): a fresh
    shell in the clone has no venv on its PATH, and a pasted command must still work."""
    script = Path(sys.executable).with_name("mnist-study")
    found = shutil.which("mnist-study")
    if found and Path(found).resolve() == script.resolve():
        return "mnist-study"
    return os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)


def cmd_status(args: argparse.Namespace) -> int:
    from mnist_study.study.spec_file import find_spec, load_spec
    from mnist_study.study.status import print_status

    print_status(load_spec(find_spec(args.spec)), args.tracking_uri, args.storage)
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    """Each study in the store with its address in the MLflow UI; an experiment that
    holds no study (made by hand, or by `train --mlflow`) is listed and said to be one."""
    from mnist_study.study.record import NoStudy, StudyRecord
    from mnist_study.tracking.names import VIEW_TAG, ui_link
    from mnist_study.tracking.store import check_tracking_uri, studies

    check_tracking_uri(args.tracking_uri, must_exist=True)
    found = studies(args.tracking_uri)
    for name, experiment_id, tags in found:
        link = ui_link(experiment_id, ui=args.ui, view=VIEW_TAG in tags)
        try:
            StudyRecord.from_tags(tags, name)
        except NoStudy:
            link += "  (no study: made by hand or by `train --mlflow`)"
        print(f"  {name:<12} {link}")
    if not found:
        print("  no studies yet: make quick, or make ablations")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """The studies' links, then MLflow's UI on the store (behind ui_server's layer) until
    Ctrl-C: a missing store or a taken port refused in one line first, no request log,
    Ctrl-C ending it in seconds without tracebacks."""
    import signal

    from mnist_study.tracking.store import check_tracking_uri
    from mnist_study.tracking.ui_server import bind, serve

    check_tracking_uri(args.tracking_uri, must_exist=True)  # before any line is printed
    try:
        layer = bind(args.port)
    except OSError as exc:
        raise port_taken(args.port, exc, "make ui UI_PORT=5001") from None
    args.ui = f"http://127.0.0.1:{args.port}"
    print(f"MLflow UI: {args.ui}  (Ctrl-C to stop); each study's runs, its numbers as columns:")
    cmd_studies(args)

    def stop(signum, frame):  # also where SIGINT came ignored (a background job)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    code = serve(args.tracking_uri, layer)
    print("MLflow UI stopped")
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from mnist_study.analysis.publish import brief, check_places, write_report
    from mnist_study.study.spec_file import find_spec, load_spec
    from mnist_study.tracking.store import (
        check_tracking_uri,
        find_experiment,
        follow_artifact_place,
    )

    study = str(args.study)
    if args.tunings is not None and args.tunings < 1:
        raise ConfigError(f"--tunings {args.tunings}: must be at least 1")
    raw = None
    if args.runs is not None:  # the published raw runs alone: no store is read
        spec = load_spec(find_spec(study))
        study, raw = spec.name, (args.runs, spec)
    else:
        study = load_spec(study).name if study.endswith(".toml") else study
        check_tracking_uri(args.tracking_uri, must_exist=True)
        found = find_experiment(args.tracking_uri, study)
        if found is None:
            raise ConfigError(
                f"no study {study!r} in {args.tracking_uri}; run it first "
                f"(mnist-study run SPEC) or pass --tracking-uri"
            )
    check_places(args.out, study, args.page)
    if raw is None and (followed := follow_artifact_place(args.tracking_uri, found)):
        print(followed)  # before the report run logs its files
    before = args.page.read_text() if args.page and args.page.exists() else None
    body = write_report(
        args.tracking_uri, study, args.out, args.page, args.storage, args.tunings,
        args.partial, str(args.study), raw,
    )  # fmt: skip
    print(brief(body) if args.brief else body)
    page = ""
    if args.page:
        same = args.page.read_text() == before
        page = f"; {args.page} " + ("already up to date" if same else "updated")
    print(f"\nwrote {args.out / study}/ (the whole report: results.md){page}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Per training-set size of the pilot: the design table, and the fewest tunings that
    detect --effect with the spec's seeds."""
    from mnist_study.analysis.plan import (
        effect_line,
        no_pilot,
        plan_lines,
        size_facts,
        worker_counts,
    )
    from mnist_study.analysis.raw_runs import read_study
    from mnist_study.study.spec_file import find_spec, load_spec
    from mnist_study.tracking.store import check_tracking_uri

    spec = load_spec(find_spec(args.spec))
    pilot = args.pilot or spec.name
    try:
        workers = tuple(int(w) for w in args.worker_counts.split(",") if w.strip())
    except ValueError:
        raise ConfigError(
            f"--worker-counts {args.worker_counts!r}: give counts separated by commas, e.g. 2,64"
        ) from None
    bad = [f"--worker-counts {args.worker_counts}"] if any(w < 1 for w in workers) else []
    bad += [f"--effect {args.effect:g}"] if not args.effect > 0 else []
    bad += [f"--tunings {args.tunings}"] if args.tunings is not None and args.tunings < 1 else []
    if bad:
        raise ConfigError(
            f"{', '.join(bad)}: must be positive, e.g. --worker-counts 2,64 --effect 0.3"
        )
    check_tracking_uri(args.tracking_uri, must_exist=True)
    data = read_study(args.tracking_uri, pilot, tunings=args.tunings)
    if data.runs.empty:
        raise ConfigError(no_pilot(pilot, args.tracking_uri, args.spec, "has no runs here"))
    sizes = spec.settings.train_sizes or (None,)
    seeds = len(spec.settings.seeds)
    workers = worker_counts(workers)
    planned = 0
    for size in sizes:
        facts = size_facts(data.runs, data.variants, size)
        where = f"{size:,} training images" if size else pilot
        if facts is None:
            print(f"{where}: no arm of {pilot!r} has two tunings with final runs; skipped\n")
            continue
        planned += 1
        print("\n".join(plan_lines(facts, spec.settings.trials, workers)))
        print(f"\n{effect_line(facts, args.effect, seeds, spec.settings.trials, workers, where)}\n")
    if not planned:
        lacks = "has no cell tuned twice with final runs at the spec's sizes"
        raise ConfigError(no_pilot(pilot, args.tracking_uri, args.spec, lacks))
    return 0
