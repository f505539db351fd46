"""The built-in experiments: datasets, tasks, a training loop with the meter, and batch-size sweeps.

- :mod:`~noisescale.experiments.data`: offline dataset loaders (MNIST, Fashion-MNIST, digits).
- :mod:`~noisescale.experiments.tasks`: the built-in tasks (model, loss, data, unit, defaults).
- :mod:`~noisescale.experiments.training`: plain SGD with the meter, and the one evaluation probe.
- :mod:`~noisescale.experiments.plotting`: the run figure of ``noisescale measure``.
- :mod:`~noisescale.experiments.sweep`: batch-size sweeps that measure B_crit.
"""
