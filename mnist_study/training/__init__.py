"""Training one configuration.

The typed config, MNIST on disk and in memory, the model and its variants, the step and
loop, and the speed benchmark. Imports nothing else of the package but errors.py.
"""
