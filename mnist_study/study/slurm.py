"""Workers as one Slurm job array, submitted through submitit: each array task runs the
same worker loop as a local worker against the study's shared stores. Before anything is
submitted the stores, the data and submitit's folder are checked for reach from the
partition's nodes. The arrays are recorded on the study (an MLflow experiment tag), so
that the same command started again attaches to a live array instead of submitting a
second, and `status` finds them. Job states come from squeue: without accounting (no
slurmdbd) sacct, which submitit asks, has none."""

from __future__ import annotations

import importlib
import os
import shlex
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mnist_study.errors import ConfigError, ToolMissing

ARRAYS_TAG = "mnist_study.slurm_arrays"
"""Experiment tag: the study's job arrays, comma-separated, oldest first."""

LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"}

# Filesystems that every node of a cluster mounts alike; any other is this node's own.
SHARED_FILESYSTEMS = {
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs",
    "fuse.glusterfs", "cifs", "smb3", "fuse.sshfs", "wekafs", "panfs", "fuse.juicefs",
}  # fmt: skip


@dataclass(frozen=True)
class SlurmOptions:
    """What each worker's job asks of the cluster (`run --launcher slurm`)."""

    folder: str
    """submitit's job scripts, pickled calls and each worker's log; read by the nodes."""
    partition: str | None = None
    """Partition (default: the cluster's default partition)."""
    time_limit: int | None = None
    """Minutes a worker may run (default: the partition's limit); a worker stopped by
    it leaves its unit FAIL, redone by the others or the next command."""
    cpus_per_worker: int = 1
    """CPUs each worker's job asks for; a run's threads stay as the spec or --threads
    say, so that results do not depend on the launcher."""
    gpus_per_worker: int = 0
    mem: str | None = None
    """Memory per worker as sbatch reads it (e.g. 4G; default: the partition's)."""
    sbatch: tuple[str, ...] = ()
    """More sbatch options, each KEY=VALUE or a bare KEY (e.g. account=ml, exclusive)."""

    def parameters(self, study: str, workers: int) -> dict:
        """submitit's SlurmExecutor parameters for an array of `workers` tasks."""
        extra = {}
        for item in self.sbatch:
            key, _, value = item.removeprefix("--").partition("=")
            extra[key] = value if value else True
        params = {
            "job_name": f"mnist-study-{study}",
            "partition": self.partition,
            "time": self.time_limit,  # None: the partition's limit (submitit would say 5 min)
            "cpus_per_task": self.cpus_per_worker,
            "mem": self.mem,
            "array_parallelism": workers,
            "additional_parameters": extra,
            "signal_delay_s": 30,
        }
        if self.gpus_per_worker:
            params["gpus_per_task"] = self.gpus_per_worker
        return {k: v for k, v in params.items() if v is not None or k == "time"}


def slurm_options(args, study: str) -> SlurmOptions:
    """--launcher slurm's options, checked."""
    if args.workers == "auto":
        raise ConfigError("--workers auto: with --launcher slurm give the number of jobs, e.g. 8")
    for flag, value, low in (("--cpus-per-worker", args.cpus_per_worker, 1),
                             ("--gpus-per-worker", args.gpus_per_worker, 0),
                             ("--time-limit", args.time_limit, 1)):  # fmt: skip
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    return SlurmOptions(
        folder=str(args.slurm_folder.resolve() / study),
        partition=args.partition,
        time_limit=args.time_limit,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        mem=args.mem,
        sbatch=tuple(args.sbatch),
    )


def slurm_tool(*args: str) -> str:
    """A Slurm command's output; a missing or failing one refused in one line."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ToolMissing(
            f"--launcher slurm: {args[0]} not found; run on a Slurm cluster's login node "
            f"(a one-node cluster here: scripts/slurm-one-node.sh), or drop --launcher"
        ) from None
    except subprocess.TimeoutExpired:
        raise ToolMissing(f"--launcher slurm: {args[0]} did not answer in 60 s") from None
    if done.returncode:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1][:200]
        raise ConfigError(f"--launcher slurm: `{shlex.join(args)}` failed: {why}")
    return done.stdout


def partition_nodes(partition: str | None) -> list[str]:
    """The nodes a worker may land on: the partition's, or the default partition's."""
    args = ["sinfo", "-h", "-N", "-o", "%N"] + (["-p", partition] if partition else [])
    if not partition:  # sinfo lists every partition's nodes; the default is marked '*'
        default = [
            line.split()[0]
            for line in slurm_tool("sinfo", "-h", "-o", "%P %N").splitlines()
            if line.split()[0].endswith("*")
        ]
        if default:
            args += ["-p", default[0].rstrip("*")]
    nodes = sorted(set(slurm_tool(*args).split()))
    if not nodes:
        raise ConfigError(
            f"--partition {partition}: no such partition, or it has no nodes (see sinfo)"
        )
    return nodes


def filesystem_of(path: Path) -> str:
    """The type of the filesystem that holds `path` (its nearest existing folder)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    best, kind = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def reach(what: str, address: str, nodes: list[str]) -> str | None:
    """Refuse (ConfigError) an address the workers on `nodes` could not reach; return a
    line when it serves this node alone (accepted: a one-node cluster), else None."""
    here = socket.gethostname().split(".")[0]
    others = [n for n in nodes if n.split(".")[0] != here]
    scheme = urlsplit(address).scheme if "://" in address else ""
    if scheme and scheme != "sqlite":  # a server: reachable unless it is this loopback
        host = urlsplit(address).hostname or ""
        if others and host in {"localhost", "127.0.0.1", "::1"}:
            raise ConfigError(
                f"{what} {address}: this node's loopback, which the workers on "
                f"{', '.join(others[:3])} cannot reach; give the server's host name"
            )
        return None
    path = address.removeprefix("sqlite:///") if scheme else address
    if not os.path.isabs(path):
        raise ConfigError(
            f"{what} {address}: a relative path, which each Slurm job resolves in its own "
            f"working folder; give it absolute ({Path(path).resolve()})"
        )
    kind = filesystem_of(Path(path))
    if kind in SHARED_FILESYSTEMS:
        if scheme == "sqlite":
            return (
                f"{what} {address}: SQLite on {kind}, whose locks do not always hold "
                f"across nodes; an MLflow server is the safe store for many nodes"
            )
        return None
    if others:
        raise ConfigError(
            f"{what} {address}: on this node's own disk ({kind}), which the workers on "
            f"{', '.join(others[:3])} cannot read; put it on a shared filesystem"
            + (" or use a server (docs/cluster.md)" if what != "--data-root" else "")
        )
    return f"{what} {address}: on this node's own disk ({kind}): serves a one-node cluster only"


def check_reach(tracking_uri: str, storage: str, data_root: str, slurm: SlurmOptions) -> list[str]:
    """Every address the workers need, checked before anything is submitted: the lines
    to say for those that serve this node only."""
    nodes = partition_nodes(slurm.partition)
    checked = [
        reach("--tracking-uri", tracking_uri, nodes),
        reach("--storage", storage, nodes),
        reach("--data-root", data_root, nodes),
        reach("--slurm-folder", slurm.folder, nodes),
    ]
    return [line for line in checked if line]


def array_ids(tag: str | None) -> list[str]:
    return [a for a in (tag or "").split(",") if a]


def job_states(arrays: list[str]) -> dict[str, tuple[str, str]]:
    """Each task of `arrays` that Slurm still knows (running, or ended within its
    MinJobAge): '12_0' -> (state, node or the reason it waits)."""
    if not arrays:
        return {}
    found = {}
    out = slurm_tool("squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%R")
    for line in out.splitlines():
        job, state, where = (line.split("|") + ["", ""])[:3]
        if job.split("_")[0] in arrays:
            found[job] = (state, where)
    return found


def live(states: dict[str, tuple[str, str]]) -> list[str]:
    return sorted(job for job, (state, _) in states.items() if state in LIVE_STATES)


def array_task(target: str, *args) -> None:
    """One task of the array: `target` ('module:function') called with args. A stop
    signal ends the task at once until the worker loop takes signals over: submitit's
    own handler ignores SIGTERM, and through the seconds of importing torch and MLflow a
    cancelled worker would live on to claim units until Slurm's SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    module, _, name = target.partition(":")
    getattr(importlib.import_module(module), name)(*args)


def submit(target: str, args: tuple, first: int, workers: int, slurm: SlurmOptions, study: str):
    """`target`(*args, index) as an array of `workers` tasks, numbered from `first`;
    returns the array's job id."""
    import submitit

    executor = submitit.SlurmExecutor(folder=slurm.folder, max_num_timeout=0)
    executor.update_parameters(**slurm.parameters(study, workers))
    columns = [[target] * workers] + [[a] * workers for a in args]
    try:
        jobs = executor.map_array(array_task, *columns, list(range(first, first + workers)))
    except subprocess.CalledProcessError as exc:  # sbatch's refusal, said by sbatch
        why = (exc.stderr or exc.output or b"").decode(errors="replace").strip()
        raise ConfigError(f"--launcher slurm: sbatch refused the array: {why[-300:]}") from None
    return jobs[0].job_id.split("_")[0]


def cancel(arrays: list[str]) -> None:
    """scancel: Slurm sends each worker SIGTERM (it records its unit FAIL), then KILL."""
    if arrays:
        subprocess.run(["scancel", *arrays], capture_output=True, timeout=60)
