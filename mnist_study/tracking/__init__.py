"""MLflow's wing: the names a study writes there, its store and experiments, runs by id,
what made a run, one tracked training run, and older records read as today's.

The only package that imports MLflow. Imports training, never study or analysis.
"""
