"""Pure PyTorch core: stages, ODE form, weight paths, smoothness metrics, models, file I/O.

Nothing here imports Lightning.
"""
