"""How far a reader walks from `mnist-study run` to a trained, tracked run: every function
of the package that cmd_run's arguments (or what is built from them) are passed to, in
the order the code first calls them, counted by a profiler on a real one-worker study
(one variant, one trial, one seed on 300 images; about half a minute).

A stop is a function's first call (later calls are not new reading); properties read as
attributes and are left out. A function is on the walk when one of its arguments is the
parsed command line, the spec or its parts, the run options, the stores and their
classes, a unit, a config, the data, a tracker, a console, a path, or one of the
command's store addresses as a string (`--narrow`: only the command line, the spec and
its parts, the run options, the configurations made from them, paths and the
addresses; not the objects that carry them; `--no-configs`: as --narrow without the
configurations, which is the command line, the spec, the options or a store address).
A return is a stop in a file already left.

    .venv/bin/python scripts/walk.py [--list] [--narrow | --no-configs]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path, PurePath

import optuna

import mnist_study
from mnist_study import cli
from mnist_study.study.console import Console
from mnist_study.study.ledger import Ledger, TuningLedger
from mnist_study.study.optuna_storage import Database, JournalFile
from mnist_study.study.record import Resume, StudyRecord
from mnist_study.study.runner import RunOptions, Worker
from mnist_study.study.scheduler import Scheduler, Unit
from mnist_study.study.spec import Cell, StudySettings, StudySpec, Tuning, Variant
from mnist_study.study.stores import StudyStores
from mnist_study.tracking.runs import Tracker
from mnist_study.tracking.store import ExperimentStore
from mnist_study.training.config import TrainConfig
from mnist_study.training.mnist_data import Splits
from mnist_study.training.train import Training

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import TINY  # noqa: E402

PACKAGE = str(Path(mnist_study.__file__).parent)
PASSED = (argparse.Namespace, StudySpec, Tuning, Variant, Cell, RunOptions, StudyStores, Worker)
PASSED += (Scheduler, Unit, JournalFile, Database, ExperimentStore, Tracker, Console)
PASSED += (TrainConfig, Splits, Training, optuna.Study, optuna.Trial, PurePath)
PASSED += (Ledger, TuningLedger, StudyRecord, Resume)
NARROW = (
    argparse.Namespace,
    StudySpec,
    StudySettings,
    Tuning,
    Variant,
    Cell,
    RunOptions,
    TrainConfig,
)
NARROW += (PurePath,)


def is_property(frame, code) -> bool:
    if not code.co_varnames or code.co_varnames[0] != "self":
        return False
    for klass in type(frame.f_locals.get("self")).__mro__:
        found = klass.__dict__.get(code.co_name)
        if found is not None:
            return isinstance(found, property | functools.cached_property)
    return False


def walk(folder: Path, data_root: str, passed: tuple[type, ...]) -> list[tuple[str, str]]:
    spec = folder / "walk.toml"
    baseline = TINY.split("[variants.batchnorm]")[0]
    spec.write_text(baseline.replace("trials = 2", "trials = 1", 1).replace("[0, 1]", "[0]"))
    tracking, storage = f"sqlite:///{folder}/mlflow.db", str(folder / "optuna.journal")
    addresses = {tracking, storage, data_root, str(spec)}
    seen, order, started = set(), [], []  # counted from cmd_run on, not the parser's

    def profile(frame, event, arg) -> None:
        code = frame.f_code
        if event != "call" or not code.co_filename.startswith(PACKAGE):
            return
        key = (os.path.relpath(code.co_filename, PACKAGE), code.co_qualname)
        if code.co_qualname == "cmd_run":
            started.append(True)
        if not started or key in seen or is_property(frame, code):
            return
        args = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        values = [frame.f_locals.get(a) for a in args]
        if any(isinstance(v, passed) or (isinstance(v, str) and v in addresses) for v in values):
            seen.add(key)
            order.append(key)

    run = ["--data-root", data_root, "run", str(spec), "--tracking-uri", tracking]
    run += ["--storage", storage, "--workers", "1", "--quiet"]
    sys.setprofile(profile)
    try:
        cli.main(run)
    finally:
        sys.setprofile(None)
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--list", action="store_true", help="print the walk, file by file")
    parser.add_argument("--narrow", action="store_true", help="follow the command's own values")
    parser.add_argument("--no-configs", action="store_true", help="--narrow but the configs")
    args = parser.parse_args()
    passed = PASSED
    if args.narrow or args.no_configs:
        passed = tuple(t for t in NARROW if not (args.no_configs and t is TrainConfig))
    with tempfile.TemporaryDirectory() as folder:
        order = walk(Path(folder), args.data_root, passed)
    visited, returns, previous, lines = set(), 0, None, []
    for file, function in order:
        if file != previous:
            returns += file in visited
            lines.append(f"{'R ' if file in visited else '  '}{file}: {function}")
            visited.add(file)
            previous = file
        else:
            lines[-1] += f", {function}"
    if args.list:
        print("\n".join(lines))
    print(f"{len(order)} stops in {len(visited)} files; {returns} returns to a file already left")


if __name__ == "__main__":
    main()
