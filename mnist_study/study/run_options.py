"""How one `run` command runs its study: its stores, data, workers (as many as the
machine holds) and threads, and the command line that says so on every run it makes."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass

from mnist_study.errors import ConfigError
from mnist_study.store_paths import store_flags
from mnist_study.study.slurm import SlurmOptions, slurm_options
from mnist_study.study.spec import StudySpec
from mnist_study.training.config import TrainConfig
from mnist_study.training.machine import available_memory, usable_cores

# Peak resident memory of one process training the seed CNN on full MNIST (torch, the
# data in memory, MLflow): 1.3 GB measured with /usr/bin/time -v; rounded up.
WORKER_MEMORY_BYTES = 1_500_000_000


def worker_cap() -> tuple[int, str]:
    """(most workers this machine holds, why): one per core, and the memory they need."""
    cores = usable_cores()
    cap, why = cores, f"{cores} cores"
    memory = available_memory()
    if memory // WORKER_MEMORY_BYTES < cap:
        cap = max(1, memory // WORKER_MEMORY_BYTES)
        why = f"{memory / 2**30:.1f} GiB of free memory at ~{WORKER_MEMORY_BYTES / 2**30:.1f} each"
    return cap, why


# Processes sharing one GPU. Measured on an H100 with CUDA graphs (scripts/gpu-checks.sh,
# docs/speed.md): one process already keeps it busy (159k images/s; 1 to 8 processes
# together 155k-157k), as processes time-share the GPU. More than one only keep it fed
# while another logs, evaluates or starts; 4 ran the ablation study in 161-165 s.
GPU_WORKERS = 4


def auto_workers(cuda: bool) -> tuple[int, str]:
    """(workers, why) for `--workers auto`. CPU: one single-thread process per core
    (2 beat 1 two-thread process on 2 cores, `make bench --study-workers`); CUDA: enough
    processes to keep the GPU busy, within the cores and memory they need."""
    cap, why = worker_cap()
    if not cuda:
        return cap, f"one per core, within memory ({why})"
    if cap < GPU_WORKERS:
        return cap, f"{GPU_WORKERS} keep one GPU busy, this machine holds {cap} ({why})"
    return GPU_WORKERS, f"{GPU_WORKERS} keep one GPU busy"


def parse_workers(value: str) -> int | str:
    """`--workers`: "auto", or a count (checked here for a one-line error, not by argparse)."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"--workers {value}: must be 'auto' or a whole number >= 1")
    return number


def cap_workers(requested: int) -> int:
    cap, why = worker_cap()
    if requested > cap:
        print(f"--workers {requested}: this machine holds {cap} ({why}); using {cap}", flush=True)
        return cap
    return requested


def choose_workers(value: str, spec) -> int:
    """`--workers`: a count (capped by what the machine holds), or `auto`, said aloud."""
    from mnist_study.training.train import resolve_device  # torch: not for --help

    requested = parse_workers(value)
    if requested != "auto":
        return cap_workers(requested)
    workers, why = auto_workers(resolve_device(spec.defaults).type == "cuda")
    print(f"--workers auto: {workers} ({why})", flush=True)
    return workers


def cap_threads(requested: int | None) -> int | None:
    """More threads per run than cores only makes them wait on each other (14x slower
    measured with 1000 on 2 cores)."""
    cores = usable_cores()
    if requested is not None and requested > cores:
        print(f"--threads {requested}: this machine has {cores} cores; using {cores}", flush=True)
        return cores
    return requested


@dataclass(frozen=True)
class RunOptions:
    tracking_uri: str
    storage: str
    data_root: str
    workers: int = 1
    threads: int | None = None
    """Threads per run (None: the spec's; 0: one per core). Never derived from the worker
    count: runs with other thread counts round differently, and results must not depend
    on how many workers ran them."""
    quiet: bool = False
    log_models: bool = True
    allow_mixed: bool = False
    """Resume on other code, threads, device or data (recorded; the report says so)."""
    slurm: SlurmOptions | None = None
    """Workers as Slurm jobs (--launcher slurm), else processes here."""
    detach: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: StudySpec) -> RunOptions:
        """`run`'s command line, checked: a local run's workers and threads capped by what
        this machine holds (a Slurm run's are the nodes')."""
        if args.threads is not None and not 0 <= args.threads <= 1024:
            raise ConfigError(f"--threads {args.threads}: must be in [0, 1024] (0: one per core)")
        if args.launcher == "slurm":
            slurm = slurm_options(args, spec.name)
            workers, threads = parse_workers(args.workers), args.threads
        elif args.detach:
            raise ConfigError("--detach: only with --launcher slurm (local workers end with it)")
        else:
            slurm = None
            workers, threads = choose_workers(args.workers, spec), cap_threads(args.threads)
        return cls(
            tracking_uri=args.tracking_uri,
            storage=args.storage,
            data_root=str(args.data_root.resolve() if slurm else args.data_root),
            workers=workers,
            threads=threads,
            quiet=args.quiet,
            allow_mixed=args.allow_mixed,
            slurm=slurm,
            detach=args.detach,
        )

    def headline(self, spec: StudySpec) -> str:
        """What `run` is about to run, and where."""
        s = spec.settings
        cells = f" x {len(s.train_sizes)} training-set sizes" if s.train_sizes else ""
        tunings = f" x {s.tunings} tunings" if s.tunings > 1 else ""
        threads = self.run_threads(spec.defaults)
        return (
            f"study {spec.name!r}: {len(spec.variants)} variants{cells}{tunings} x ({s.trials} "
            f"trials + {len(s.seeds)} seeds); MLflow {self.tracking_uri}, Optuna "
            f"{self.storage}; {self.workers} worker(s), "
            + (f"{threads} thread(s) per run" if threads else "one thread per core per run")
        )

    def run_threads(self, cfg: TrainConfig) -> int:
        """The threads a run of `cfg` gets: --threads, else the spec's (0: one per core)."""
        return cfg.threads if self.threads is None else self.threads

    def store_args(self) -> list[str]:
        """The flags that name these stores, where they are not the defaults."""
        return store_flags(self.tracking_uri, self.storage)

    def command(self, spec_path) -> str:
        """The command that runs this study into these stores (a run's source tag)."""
        return shlex.join(
            [
                "mnist-study",
                "run",
                str(spec_path),
                *self.store_args(),
                "--workers",
                str(self.workers),
            ]
            + (["--launcher", "slurm"] if self.slurm else [])
            + (["--threads", str(self.threads)] if self.threads is not None else [])
        )

    def report_command(self, spec_path) -> str:
        """The command that reports this study from these stores."""
        return shlex.join(["mnist-study", "report", str(spec_path), *self.store_args()])
