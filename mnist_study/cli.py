"""The `mnist-study` command line: its arguments (the training flags built from the typed
config) and the dispatch to commands.py. The one error boundary of every command: an
error meant for the user, a failure of the environment (a file system, a database or a
server that refuses) or a training that diverged is one line, exit 2, and the traceback
only with --debug; any other exception is a bug of ours and keeps its traceback."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

from mnist_study import commands
from mnist_study.errors import said_in_one_line
from mnist_study.store_paths import DEFAULT_STORAGE, DEFAULT_TRACKING_URI
from mnist_study.tracking.retries import bound_remote_retries
from mnist_study.training.config import TrainConfig, field_docs

DEFAULT_DATA_ROOT = Path("data")
RESTORE_HELP = """a page's raw runs (docs/data/STUDY-runs.csv) of a study whose stores were
lost: its whole tunings are restored into new stores first, and the study runs on from them"""


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed and documented from the config itself."""
    docs, defaults = field_docs(), TrainConfig()
    group = parser.add_argument_group(
        "configuration (defaults from mnist_study/training/config.py)"
    )
    for name, field in TrainConfig.model_fields.items():
        hint = field.annotation
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        help_text = f"{docs.get(name, '')} (default: {default})"
        if hint is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif typing.get_origin(hint) is typing.Literal:
            group.add_argument(flag, dest=name, choices=typing.get_args(hint), help=help_text)
        else:
            group.add_argument(
                flag, dest=name, type=hint, metavar=hint.__name__.upper(), help=help_text
            )


def add_tracking_uri(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
        help=f"{what} (default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})",
    )


def add_storage(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--storage",
        default=os.environ.get("OPTUNA_STORAGE", DEFAULT_STORAGE),
        help=f"{what} (default: $OPTUNA_STORAGE or {DEFAULT_STORAGE})",
    )


class OneLineParser(argparse.ArgumentParser):
    """A wrong command line is refused in one line, as every other input is: the error
    and where the usage is, not the usage itself (its subcommands' parsers are its kind)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--epoch` is not taken for `--epochs`
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mnist-study",
        description="What actually stops a small CNN from overfitting MNIST? Train one "
        "configuration, run a tuned and seeded study of the variants, report it.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=bool(os.environ.get("MNIST_STUDY_DEBUG")),
        help="show the traceback of a failure instead of its one line (also: MNIST_STUDY_DEBUG=1)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA_ROOT,
        help="folder holding MNIST/raw (default: data)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in (add_training_commands, add_run_command, add_report_command,
                         add_plan_command, add_browse_commands):  # fmt: skip
        add_commands(sub)
    return parser


def add_data_root(p: argparse.ArgumentParser) -> None:
    """--data-root after the command too (`run SPEC --data-root D`), shown in its --help."""
    p.add_argument(
        "--data-root",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"folder holding MNIST/raw (default: {DEFAULT_DATA_ROOT})",
    )


def add_training_commands(sub) -> None:
    p = sub.add_parser("data", help="fetch and verify the four MNIST files")
    add_data_root(p)
    p.set_defaults(func=commands.cmd_data)

    p = sub.add_parser("train", help="train one configuration, one line per epoch")
    add_data_root(p)
    add_config_flags(p)
    p.add_argument("--seeds", type=int, nargs="+", help="train once per seed, then mean ± sd")
    p.add_argument("--test", action="store_true", help="evaluate on the test set at the end")
    p.add_argument(
        "--mlflow", metavar="EXPERIMENT", help="also log each seed's run to this MLflow experiment"
    )
    add_tracking_uri(p, "MLflow store for --mlflow")
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("bench", help="textbook loop vs our trainer, side by side")
    add_data_root(p)
    p.add_argument("--steps", type=int, default=300, help="steps at batch 64 per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.add_argument(
        "--processes",
        action="store_true",
        help="also time whole processes: the textbook program vs mnist-study train, 1 epoch",
    )
    p.add_argument(
        "--study-workers",
        type=Path,
        metavar="SPEC",
        help="also time this whole study with 1 and then 2 workers (minutes)",
    )
    p.set_defaults(func=commands.cmd_bench)
    p = sub.add_parser("precision", help="bf16 against fp32: paired equivalence test over seeds")
    add_data_root(p)
    p.add_argument("--seeds", type=int, default=10, help="seeds per precision")
    p.add_argument("--margin", type=float, default=0.1, help="equivalence margin, points")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.set_defaults(func=commands.cmd_precision)


def add_run_command(sub) -> None:
    p = sub.add_parser("run", help="run a study spec: tune every variant, then final seeds")
    p.add_argument(
        "spec", type=Path, help="experiment file or its name, e.g. experiments/ablations.toml"
    )
    add_data_root(p)
    add_tracking_uri(p, "MLflow store")
    add_storage(p, "Optuna storage: a journal file, sqlite:///PATH or postgresql://...")
    p.add_argument(
        "--workers",
        default="1",
        help="worker processes sharing the studies (each run one thread unless --threads), or "
        "'auto': one per core on a CPU, enough to keep a GPU busy on CUDA",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="threads per run (default: the spec's, 1 unless it says; 0: one per core); "
        "recorded on every run, since runs with other thread counts round differently",
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines, only per run")
    p.add_argument("--restore", type=Path, metavar="RUNS_CSV", help=RESTORE_HELP)
    p.add_argument(
        "--allow-mixed",
        action="store_true",
        help="resume a study on other code, threads, device or data (refused without it: "
        "one table would mix two studies); recorded, and the report says which runs ran on which",
    )
    add_slurm_flags(p)
    p.set_defaults(func=commands.cmd_run)
    p = sub.add_parser("status", help="where a study stands: units done and running, Slurm jobs")
    p.add_argument("spec", type=Path, help="experiment file or its name")
    add_tracking_uri(p, "MLflow store to read")
    add_storage(p, "Optuna storage to read")
    p.set_defaults(func=commands.cmd_status)


def add_report_command(sub) -> None:
    p = sub.add_parser("report", help="results table, figures and checks of a study, from MLflow")
    p.add_argument("study", help="experiment file or study name, e.g. experiments/ablations.toml")
    add_tracking_uri(p, "MLflow store to read")
    add_storage(p, "Optuna storage to check the runs against (read only; skipped if absent)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="reports folder")
    p.add_argument(
        "--page",
        type=Path,
        help="also write the results into this Markdown page, between the study's markers "
        "(a new page is made), figures beside it in figures/STUDY/; e.g. docs/ablations.md",
    )
    p.add_argument(
        "--tunings",
        type=int,
        help="report a stage: only every cell's first N tunings (a study runs in rounds)",
    )
    p.add_argument(
        "--runs",
        type=Path,
        help="report from the raw runs a page published (docs/data/STUDY-runs.csv and the "
        "curves beside it) instead of the stores: STUDY then names its experiment file",
    )
    p.add_argument(
        "--partial",
        action="store_true",
        help="write --page from a study (or stage) that is not complete, marked partial "
        "in its header; without it such a page is left as it was",
    )
    p.add_argument(
        "--brief",
        action="store_true",
        help="print each variant's test accuracy and difference from the baseline, the "
        "verdicts and checks only, and where the whole report is",
    )
    p.set_defaults(func=commands.cmd_report)


def add_plan_command(sub) -> None:
    p = sub.add_parser(
        "plan", help="power and cost of designs (tunings x seeds) from a finished study's spread"
    )
    p.add_argument(
        "spec", type=Path, help="the experiment file to plan, e.g. experiments/replication.toml"
    )
    add_tracking_uri(p, "MLflow store to read the pilot from")
    p.add_argument(
        "--pilot",
        help="study whose variance components and run times to use (default: the spec's own)",
    )
    p.add_argument(
        "--worker-counts",
        default="",
        help="worker counts to price the wall time at, comma-separated (default: this "
        "machine's cores and 64); not --workers, which is a count of processes in `run`",
    )
    p.add_argument(
        "--effect",
        type=float,
        default=0.3,
        help="an effect in points of test accuracy: the fewest tunings that detect it",
    )
    p.add_argument(
        "--tunings",
        type=int,
        help="plan from a stage: only every cell's first N tunings of the pilot",
    )
    p.set_defaults(func=commands.cmd_plan)


def add_browse_commands(sub) -> None:
    p = sub.add_parser("studies", help="the studies in an MLflow store, with their UI addresses")
    add_tracking_uri(p, "MLflow store to read")
    p.add_argument("--ui", default="http://127.0.0.1:5000", help="the MLflow UI's address")
    p.set_defaults(func=commands.cmd_studies)
    p = sub.add_parser(
        "ui", help="MLflow's UI on a study store, on 127.0.0.1: the links, then the server"
    )
    add_tracking_uri(p, "MLflow store to show")
    p.add_argument("--port", type=int, default=5000, help="the port to serve on (default: 5000)")
    p.set_defaults(func=commands.cmd_ui)
    p = sub.add_parser("dashboard", help="optuna-dashboard on the tuning studies, on 127.0.0.1")
    add_storage(p, "Optuna storage to show")
    p.add_argument("--port", type=int, default=8080, help="the port to serve on (default: 8080)")
    p.set_defaults(func=cmd_dashboard)


def add_slurm_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Slurm (with --launcher slurm; docs/cluster.md)")
    g.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: worker processes here; slurm: --workers jobs of one Slurm job array, "
        "submitted through submitit, sharing the stores (default: local)",
    )
    g.add_argument("--partition", help="partition (default: the cluster's default)")
    g.add_argument(
        "--time-limit", type=int, metavar="MINUTES", help="per worker (default: the partition's)"
    )
    g.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs per job (default: 1)")
    g.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs per job (default: 0)")
    g.add_argument("--mem", help="memory per job as sbatch reads it, e.g. 4G")
    g.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="another sbatch option, e.g. --sbatch account=ml (repeatable)",
    )
    g.add_argument(
        "--slurm-folder",
        type=Path,
        default=Path("mlruns/slurm"),
        help="submitit's scripts and the workers' logs, in STUDY/ below it, on a filesystem "
        "the nodes share (default: mlruns/slurm)",
    )
    g.add_argument(
        "--detach",
        action="store_true",
        help="submit and return; `mnist-study status SPEC` shows progress, the same command "
        "attaches again",
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    from mnist_study.study.dashboard import serve  # optuna's imports, for this command only

    return serve(args.storage, args.port)


def main(argv: list[str] | None = None) -> int:
    # MLflow's INFO lines (creating tables, ...) say nothing a user acts on; its warnings
    # stay. An environment variable, so that worker processes inherit it.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    bound_remote_retries()  # a failing tracking server: a line, half a minute, then one more
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command they were given to, not by mnist-study's own parser
        command = f"{parser.prog} {args.command}"
        parser.exit(
            2, f"{command}: error: unrecognized arguments: {' '.join(unknown)}; "
            f"see {command} --help\n"
        )  # fmt: skip
    inherited = os.environ.get("MNIST_STUDY_DEBUG")
    if args.debug:  # for the workers too, for this command only
        os.environ["MNIST_STUDY_DEBUG"] = "1"
    try:
        return args.func(args)
    except Exception as exc:
        if not said_in_one_line(exc):
            raise
        return 2
    finally:
        if inherited is None:
            os.environ.pop("MNIST_STUDY_DEBUG", None)


if __name__ == "__main__":
    sys.exit(main())
