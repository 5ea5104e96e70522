"""Running a study.

Spec files, the two stores (Optuna record, MLflow mirror) and their agreement, worker
processes, and the units they claim and track. Imports training, never analysis.
"""
