"""mnist-study: what actually stops a small CNN from overfitting MNIST? A tuned, seeded,
tracked ablation study. The package has three wings, imported in one direction:
analysis -> study -> training (see pyproject.toml, [tool.importlinter])."""
