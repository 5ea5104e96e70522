"""Reading a study back from MLflow.

Statistics, tables, figures, the ablation and sweep sections of its report, and
publishing it. Imports study, tracking and training, never cli.
"""
