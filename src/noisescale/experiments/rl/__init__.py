"""Reinforcement learning: the ``cartpole`` task, an A2C agent and its training loop with the meter.

- :mod:`~noisescale.experiments.rl.agent`: the actor-critic (policy and value MLPs), GAE, the A2C loss.
- :mod:`~noisescale.experiments.rl.env`: independent seeded copies of a gymnasium environment and
  the rollouts of an update.
- :mod:`~noisescale.experiments.rl.task`: the built-in RL tasks and their defaults (unit: observations).
- :mod:`~noisescale.experiments.rl.training`: one update at a time (:class:`RLTrainer`), a run
  (:func:`train_rl`), what a run adds to ``summary.json``.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162, Table 1.
"""

from noisescale.experiments.rl.task import RL_TASK_NAMES, RLTask, get_rl_task
from noisescale.experiments.rl.training import RLStepRecord, RLTrainer, rl_results, train_rl

__all__ = ["RL_TASK_NAMES", "RLStepRecord", "RLTask", "RLTrainer", "get_rl_task", "rl_results", "train_rl"]
