"""Every error the package raises on purpose, and which failures are the user's input or
environment. The user-facing ones (ConfigError and its kinds, DataError) carry a one-line
message that names the file, key or value and says what would be right; `mnist-study`
(and each of its workers) prints it, or the environment's failure, in one line and exits
with code 2."""

from __future__ import annotations

import errno
import os
import sys


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message is one line."""


def port_taken(port: int, exc: OSError, retry: str) -> ConfigError:
    """The refusal of a server's port that cannot be bound; `retry`: the command that
    would use another."""
    return ConfigError(
        f"--port {port}: {exc.strerror.lower()} (another server listens there); stop it, "
        f"or choose another port ({retry})"
    )


class SpecError(ConfigError):
    """An experiment file that cannot be run; the message names file and key."""


class StoresDisagree(ConfigError):
    """The MLflow store and the Optuna storage describe different histories."""


class StorageLost(ConfigError):
    """The journal a study runs on was removed or replaced under it."""


class PageRefused(ConfigError):
    """A page the report will not publish (its study is not complete): left as it was."""


class DataError(RuntimeError):
    """Missing or corrupt data; the message is one line and says how to fix it."""


class ToolMissing(RuntimeError):
    """A program the command needs (Slurm's sinfo, sbatch, ...) is not here or does not
    answer: the machine's, not the configuration's; one line saying where to run."""


class Diverged(ArithmeticError):
    """The training loss became NaN or infinite; training stopped there."""

    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"loss became {loss} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


class StudyIncomplete(RuntimeError):
    """Workers stopped (died) before the budget was spent; the message says how to resume."""


class WorkerRefused(Exception):
    """A worker refused to go on; its one-line reason is printed already."""


MESSAGE_CAP = 500  # characters: a refusal is read at a glance, whatever its value holds
# The libraries through which the environment fails (a store, a server, a database);
# matched by module so that `--help` imports none of them.
OUTSIDE = ("mlflow.", "sqlalchemy.", "psycopg", "requests.", "urllib3.", "optuna.")


# What would be right, by the operating system's reason for refusing a file.
_ACCESS = "give this user access to it, or choose another place"
_SPACE = "free some space there, or point it at another disk"
OS_REMEDIES = {
    errno.EACCES: _ACCESS,
    errno.EPERM: _ACCESS,
    errno.EROFS: "that file system is read-only; choose a writable place",
    errno.ENOSPC: _SPACE,
    errno.EDQUOT: _SPACE,
    errno.EISDIR: "it is a folder; name a file",
    errno.ENOTDIR: "a part of that path is a file, not a folder",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def said_in_one_line(exc: BaseException) -> bool:
    """Print the one line for a failure of the user's input or environment on stderr;
    False, printing nothing, for a bug of ours or under --debug (MNIST_STUDY_DEBUG),
    which the caller re-raises to show its traceback. The boundary of the command and of
    each of its workers."""
    line = environment_error(exc)
    if line is None or os.environ.get("MNIST_STUDY_DEBUG"):
        return False
    print(f"mnist-study: error: {line}", file=sys.stderr, flush=True)
    return True


def environment_error(exc: BaseException) -> str | None:
    """The one line (at most MESSAGE_CAP characters) for a failure that is the user's
    input or environment, else None: a bug of ours keeps its traceback."""
    line = failure_line(exc)
    if line is not None and len(line) > MESSAGE_CAP:
        line = line[: MESSAGE_CAP - 1] + "…"
    return line


def failure_line(exc: BaseException) -> str | None:
    if isinstance(exc, ConfigError | DataError | ToolMissing):
        return str(exc)
    if isinstance(exc, Diverged):
        return f"training diverged: {exc}; lower --lr (or the regularizer's strength)"
    if isinstance(exc, OSError) and not type(exc).__module__.startswith(OUTSIDE):
        where = ": ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        remedy = OS_REMEDIES.get(exc.errno)
        return f"{where or type(exc).__name__}: {exc.strerror or exc}" + (
            f"; {remedy}" if remedy else ""
        )
    if any(k.__module__.startswith(OUTSIDE) for k in type(exc).__mro__):
        first = next((s.strip() for s in str(exc).splitlines() if s.strip()), "")
        return f"{type(exc).__name__}: {first}"
    return None
