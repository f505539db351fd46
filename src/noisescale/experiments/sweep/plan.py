"""Planning the runs of a sweep: the initial learning-rate grids, then widening them where needed.

When the best learning rate of a batch size sits on the edge of its grid and beats its
neighbour, the grid is widened by one point on that side and the new run is trained, up to
``max_widenings`` times per batch size. The best run of a batch size is the one that reached
the most goals, and of those the one that reached its last goal in the fewest steps. The plan
is a pure function of the finished records, so an interrupted sweep resumes into the same plan.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    appendix A.2-A.3.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from noisescale.experiments.sweep.config import RunSpec, SweepConfig
from noisescale.experiments.sweep.store import RunRecord

__all__ = ["best_lr_index", "missing_runs", "plan_next", "plan_widening"]


def _score(record: RunRecord) -> tuple[int, float]:
    """Goals reached (more is better) and the steps to the last of them (fewer is better)."""
    reached = [g.steps for g in record.goals if g.reached and g.steps is not None]
    if reached:
        return len(reached), -float(max(reached))
    loss = record.final_loss  # no goal reached: the lowest final loss
    if record.stopped == "diverged" or loss is None or not math.isfinite(loss):
        return 0, -math.inf
    return 0, -float(loss)


def best_lr_index(records: dict[RunSpec, RunRecord], batch_size: int) -> int | None:
    """The learning-rate index of the best run at ``batch_size`` (None: no run there).

    Best: most goals reached, then fewest steps to the last of them; with no goal reached,
    the lowest final loss (held-out where evaluated, else training) of the runs that did not
    diverge. Ties go to the index nearest the rule's value, so a tie with an edge does not
    widen the grid.
    """
    runs = {s.lr_index: r for s, r in records.items() if s.batch_size == batch_size}
    if not runs:
        return None
    return max(runs, key=lambda i: (*_score(runs[i]), -abs(i)))


def plan_widening(config: SweepConfig, records: dict[RunSpec, RunRecord]) -> list[RunSpec]:
    """Runs that widen the learning-rate grid of each batch size whose best value is on its edge.

    Args:
        config: the sweep.
        records: the finished runs.

    Returns:
        At most one new run per batch size, one grid step beyond the edge holding the best run
        (when it beats its neighbour), while the batch size has fewer than ``max_widenings``
        extra learning rates.
    """
    base = len(config.base_lr_indices())
    plan = []
    for b in config.batch_sizes:
        runs = {s.lr_index: r for s, r in records.items() if s.batch_size == b}
        have = sorted(runs)
        if len(have) < 2 or len(have) >= base + config.max_widenings:
            continue
        best = best_lr_index(records, b)
        # Widen only when the edge beats its neighbour: a tie puts the optimum inside the grid.
        for edge, inner, step in ((have[0], have[1], -1), (have[-1], have[-2], 1)):
            if best == edge and _score(runs[edge]) > _score(runs[inner]):
                plan.append(RunSpec(b, edge + step))
    return plan


def missing_runs(config: SweepConfig, records: Iterable[RunSpec]) -> list[RunSpec]:
    """Runs of the initial learning-rate grids that have no record yet."""
    have = set(records)
    grid = (RunSpec(b, i) for b in config.batch_sizes for i in config.base_lr_indices())
    return [s for s in grid if s not in have]


def plan_next(config: SweepConfig, records: dict[RunSpec, RunRecord]) -> list[RunSpec]:
    """The runs to train next: the initial grid's missing runs, else the next widening round.

    A pure function of the finished records, so an interrupted sweep resumes into the same plan.
    """
    return missing_runs(config, records) or plan_widening(config, records)
