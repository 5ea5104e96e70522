"""Running a study.

Spec files, Optuna's record and its agreement with MLflow's mirror, worker processes,
and the units they claim and run. Imports tracking and training, never analysis.
"""
