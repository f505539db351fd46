"""The built-in experiments: datasets, tasks, a training loop with the meter, and batch-size sweeps.

- :mod:`~noisescale.experiments.data`: offline dataset loaders (MNIST, Fashion-MNIST, digits, Shakespeare).
- :mod:`~noisescale.experiments.tasks`: the built-in tasks (model, loss, data, unit, defaults).
- :mod:`~noisescale.experiments.transformer`: the character GPT of ``shakespeare``.
- :mod:`~noisescale.experiments.optim`: SGD or AdamW after a linear warmup.
- :mod:`~noisescale.experiments.training`: the training loop with the meter.
- :mod:`~noisescale.experiments.evaluation`: the one evaluation probe (losses, error, bits per character).
- :mod:`~noisescale.experiments.plotting`: the run figure of ``noisescale measure``.
- :mod:`~noisescale.experiments.sweep`: batch-size sweeps that measure B_crit.
"""
