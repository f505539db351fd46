"""The result of a branched measurement: B_crit per branch point, ``branch.json`` and ``branch.png``.

``branch.json`` (what ``noisescale branch --json`` prints; non-finite numbers are null)::

    {"task", "unit",                         # every batch size and example count is in `unit`
     "settings": {...BranchConfig, "confidence", "n_bootstrap"},
     "points": [{"examples", "step", "loss", "kind", "target",
                 "b_crit", "b_crit_ci", "bound",   # b_crit null when `bound` says B_crit >= or <= a size,
                 "note",                            # or when the base batch made no progress (why)
                 "window",                          # examples each branch of the point trained
                 "b_crit_cumulative", "b_crit_cumulative_ci",   # E_min/S_min from initialisation to the
                 "b_crit_cumulative_bound", "b_crit_cumulative_note",  # point: comparable with a sweep
                 "b_crit_cumulative_bracket",       # with a bound: [low, high] it lies in (null: inf)
                 "e_min_cumulative", "s_min_cumulative",        # (critical.branched.cumulative_chain)
                 "b_simple", "b_simple_ci",         # the base run's meter at the point
                 "kappa_star", "replicas",
                 "branches": [{"batch_size", "loss", "examples_ratio" | "excess_loss", "keeps_up"}],
                 "truth": {...} | null}],           # exact values at the point (linreg)
     "readings": [{"target", "examples", "step", "loss", "b_simple", "b_simple_ci",   # where the base
                   "b_crit_cumulative", "b_crit_cumulative_ci", "b_crit_cumulative_bound",  # first reached
                   "b_crit_cumulative_note", "b_crit_cumulative_bracket",                # each reading loss
                   "e_min_cumulative", "s_min_cumulative"}],
     "unreached": [loss points and readings the base run did not reach],
     "examples_spent": {"base", "branches", "total"},
     "cpu_time_s": {"base", "branches", "total"}}

References:
    Merrill et al. (2025), Critical Batch Size Revisited, arXiv:2505.23971, section 3.1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from noisescale.critical.branched import BranchedCritical, cumulative_chain, decide
from noisescale.experiments.branch.config import BranchConfig
from noisescale.experiments.branch.run import BranchRecord, prepare_branch_dir, run_base, run_branches
from noisescale.experiments.plotting import plot_branch
from noisescale.experiments.tasks import Task, get_task
from noisescale.io import to_jsonable, write_json

__all__ = ["BranchResult", "branch_report", "run_branched"]


class BranchResult(NamedTuple):
    """A finished measurement: the report (``branch.json``), the files written, branches trained now."""

    report: dict[str, Any]
    files: list[Path]
    trained: int


def branch_report(
    config: BranchConfig,
    unit: str,
    base: dict[str, Any],
    records: dict[tuple[int, int, int], BranchRecord],
    *,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """``branch.json`` from the base run and every branch (see the module docstring).

    Raises:
        KeyError: if a branch of a point is missing.
    """
    points, results = [], []
    for p in base["points"]:
        window = config.window_at(p["examples"])
        losses = np.array(
            [
                [
                    [np.nan if v is None else v for v in records[(p["index"], k, r)].loss]
                    for k in config.kappas
                ]
                for r in range(config.replicas)
            ],
            dtype=np.float64,
        )  # [R, K, T]
        result = decide(
            config.check_examples(window),
            losses,
            config.kappas,
            config.batch_size,
            tolerance=config.tolerance,
            kind=config.tolerance_kind,
            smoothing=config.smoothing,
            confidence=confidence,
            n_bootstrap=n_bootstrap,
            seed=config.seed + p["index"],
        )
        keep = ("examples", "step", "loss", "kind", "target", "b_simple", "b_simple_ci", "truth")
        results.append(result)
        points.append({**{k: p[k] for k in keep}, "window": window, **result.to_dict(config.tolerance_kind)})
    starts = [p["examples"] for p in points]
    readings = [
        {k: r[k] for k in ("target", "examples", "step", "loss", "b_simple", "b_simple_ci")}
        for r in base["readings"]
    ]
    for row in (*points, *readings):
        row.update(_cumulative(starts, results, config.batch_size, row["examples"], confidence))
    branch_examples = config.replicas * len(config.kappas) * sum(p["window"] for p in points)
    cpu_branches = sum(r.cpu_time_s for r in records.values())
    return {
        "task": config.task,
        "unit": unit,
        "settings": {**config.to_dict(), "confidence": confidence, "n_bootstrap": n_bootstrap},
        "points": points,
        "readings": readings,
        "unreached": base["unreached"],
        "examples_spent": {
            "base": base["examples"],
            "branches": branch_examples,
            "total": base["examples"] + branch_examples,
        },
        "cpu_time_s": {
            "base": base["cpu_time_s"],
            "branches": cpu_branches,
            "total": base["cpu_time_s"] + cpu_branches,
        },
    }


def _cumulative(
    starts: list[float], results: list[BranchedCritical], batch_size: int, until: float, confidence: float
) -> dict[str, Any]:
    """The B_crit from initialisation to ``until`` examples of the base run (its points are in order)."""
    c = cumulative_chain(starts, results, batch_size, until, confidence=confidence)
    return {
        "b_crit_cumulative": c.b_crit,
        "b_crit_cumulative_ci": None if c.b_crit_ci is None else list(c.b_crit_ci),
        "b_crit_cumulative_bound": c.bound,
        "b_crit_cumulative_bracket": None if c.bracket is None else to_jsonable(list(c.bracket)),
        "b_crit_cumulative_note": c.note,
        "e_min_cumulative": c.e_min,
        "s_min_cumulative": c.s_min,
    }


def run_branched(
    config: BranchConfig,
    out: str | Path,
    *,
    task: Task | None = None,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    on_plan: Callable[[int], None] | None = None,
    on_record: Callable[[BranchRecord], None] | None = None,
) -> BranchResult:
    """Run (or resume) a branched measurement into ``out`` and write ``branch.json`` and ``branch.png``.

    Args:
        config: the measurement.
        out: its directory.
        task: the task named by ``config.task`` (loaded when None).
        confidence: level of the intervals.
        n_bootstrap: replica resamples per point.
        on_plan: called with the number of branches still to train (after the base run).
        on_record: called with every branch trained now.

    Returns:
        The report, the files written and how many branches were trained now.

    Raises:
        BranchConfigError: if ``out`` holds another measurement or cannot hold this one.
    """
    task = task if task is not None else get_task(config.task)
    prepare_branch_dir(out, config)
    base = run_base(task, config, out)
    trained = 0

    def counted(record: BranchRecord) -> None:
        nonlocal trained
        trained += 1
        if on_record is not None:
            on_record(record)

    records = run_branches(task, config, out, base, on_plan=on_plan, on_record=counted)
    report = branch_report(config, task.unit, base, records, confidence=confidence, n_bootstrap=n_bootstrap)
    files = [Path(out, "branch.json"), Path(out, "branch.png")]
    write_json(files[0], report)
    title = f"{config.task}: branched from B = {config.batch_size} {task.unit}, lr {config.lr:g}"
    plot_branch(report["points"], base["curve"], files[1], unit=task.unit, title=title, confidence=confidence)
    return BranchResult(report, files, trained)
