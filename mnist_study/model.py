"""The old address of training/model.py. Models logged before the package had its three
wings pickled their classes as `mnist_study.model.*`; loading one (mlflow.pytorch.
load_model) imports this module to find them. Nothing in the package imports it."""

from mnist_study.training.model import *  # noqa: F403
