"""Branched training of the built-in tasks: B_crit along a run from short branches at larger batches.

- :mod:`~noisescale.experiments.branch.config`: the base run, the multipliers, the window, the
  tolerance, the learning-rate rule; defaults per task.
- :mod:`~noisescale.experiments.branch.run`: the base run with its checkpoints and the branches,
  each saved at once (resumable).
- :mod:`~noisescale.experiments.branch.results`: the test per branch point
  (:mod:`noisescale.critical.branched`), ``branch.json`` and ``branch.png``.

References:
    Merrill et al. (2025), Critical Batch Size Revisited, arXiv:2505.23971, section 3.1.
"""

from noisescale.experiments.branch.config import BRANCH_FORMAT, LR_POWER, BranchConfig
from noisescale.experiments.branch.results import BranchResult, branch_report, run_branched
from noisescale.experiments.branch.run import BranchRecord, load_branches, run_base, run_branches

__all__ = [
    "BRANCH_FORMAT",
    "LR_POWER",
    "BranchConfig",
    "BranchRecord",
    "BranchResult",
    "branch_report",
    "load_branches",
    "run_base",
    "run_branched",
    "run_branches",
]
