"""Batch-size sweeps of the built-in tasks: steps and examples to each goal, and B_crit.

- :mod:`~noisescale.experiments.sweep.config`: the grid, the learning-rate rule, goals, budgets.
- :mod:`~noisescale.experiments.sweep.run`: training one run to its goals; runs in parallel.
- :mod:`~noisescale.experiments.sweep.plan`: the learning-rate grids and their widening.
- :mod:`~noisescale.experiments.sweep.store`: the sweep directory and the typed run records.
- :mod:`~noisescale.experiments.sweep.results`: ``results.csv``, ``fit.json`` and the plots,
  made by the same functions as ``noisescale fit``.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    eqs. (2.6), (2.11)-(2.12), appendix A.2-A.3, D and Table 1.
"""

from noisescale.experiments.sweep.config import METRICS, SWEEP_TASKS, Goal, RunSpec, SweepConfig, lr_rule
from noisescale.experiments.sweep.plan import best_lr_index, missing_runs, plan_next, plan_widening
from noisescale.experiments.sweep.results import SweepResult, results_table, run_sweep, write_results
from noisescale.experiments.sweep.run import execute_runs, run_one, train_run
from noisescale.experiments.sweep.store import (
    CurvePoint,
    GoalRecord,
    RunRecord,
    load_records,
    prepare_sweep_dir,
    write_record,
)

__all__ = [
    "METRICS",
    "SWEEP_TASKS",
    "CurvePoint",
    "Goal",
    "GoalRecord",
    "RunRecord",
    "RunSpec",
    "SweepConfig",
    "SweepResult",
    "best_lr_index",
    "execute_runs",
    "load_records",
    "lr_rule",
    "missing_runs",
    "plan_next",
    "plan_widening",
    "prepare_sweep_dir",
    "results_table",
    "run_one",
    "run_sweep",
    "train_run",
    "write_record",
    "write_results",
]
