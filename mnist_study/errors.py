"""Every error the package raises on purpose. The user-facing ones (ConfigError and its
kinds, DataError) carry a one-line message that names the file, key or value and says
what would be right; `mnist-study` prints it and exits with code 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message is one line."""


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


class Diverged(ArithmeticError):
    """The training loss became NaN or infinite; training stopped there."""

    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"loss became {loss} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


class StudyIncomplete(RuntimeError):
    """Workers stopped (died) before the budget was spent; the message says how to resume."""


class WorkerRefused(Exception):
    """A worker refused to go on; its one-line reason is printed already."""
