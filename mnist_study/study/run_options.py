"""How one `run` command runs its study: its stores, data, workers and threads, and
the command line that says so on every run it makes."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from mnist_study.store_paths import store_flags
from mnist_study.study.slurm import SlurmOptions
from mnist_study.training.config import TrainConfig


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
