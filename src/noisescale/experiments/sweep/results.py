"""A sweep's results: ``results.csv`` from the run records, then ``fit.json`` and the plots from it.

The table follows the one rule of :mod:`noisescale.critical.goals`, the rule ``noisescale fit``
applies to users' loss curves: per (goal, batch size) each run's crossing is read off its
checks (interpolated, with the checks around it as its bracket), and the fastest run to the
goal stands for its batch size; where none reached it, the batch size is censored at the fewest
steps of the runs that ran to their end (else that did not diverge, else all).

``fit.json`` is :func:`noisescale.critical.report.report_from_file` of the ``results.csv``
just written, the very function ``noisescale fit`` runs: ``noisescale fit <dir>/results.csv
--json`` (with the sweep's ``--bootstrap`` and ``--confidence``) prints ``fit.json`` exactly.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    appendix A.2-A.3.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from noisescale.critical.fit import check_fit_settings
from noisescale.critical.goals import RunOutcome, fastest, run_mean
from noisescale.critical.plotting import plot_report
from noisescale.critical.report import FitReport, FitSettings, report_from_file
from noisescale.critical.sweepdata import COLUMNS
from noisescale.errors import SweepConfigError, SweepDataError
from noisescale.experiments.sweep.config import RunSpec, SweepConfig
from noisescale.experiments.sweep.plan import plan_next
from noisescale.experiments.sweep.run import Executor, execute_runs, goal_crossing
from noisescale.experiments.sweep.store import RunRecord, load_records, prepare_sweep_dir
from noisescale.io import atomic_write_text, write_json

__all__ = ["SweepResult", "results_table", "run_sweep", "write_results"]


def results_table(config: SweepConfig, records: dict[RunSpec, RunRecord]) -> pd.DataFrame:
    """The sweep as one row per (goal, batch size): the fastest run reaching the goal, or censored.

    Returns:
        The table of :data:`noisescale.critical.sweepdata.COLUMNS`, in goal order then batch size.

    Raises:
        SweepDataError: if a run meets a goal at its first check, step 0 (choose a lower goal).
    """
    rows = []
    for goal in config.goals:
        for b in config.batch_sizes:
            # Preference on ties: the learning rate nearest the rule's value, then the smaller.
            runs = [r for s, r in records.items() if s.batch_size == b]
            runs.sort(key=lambda r: (abs(r.lr_index), r.lr_index))
            if not runs:
                continue
            outcomes = [RunOutcome(goal_crossing(r.curve, goal, r.name), r.stopped) for r in runs]
            k = fastest(outcomes)
            best, c = runs[k], outcomes[k].crossing
            b_simple = pre = None
            if c.reached:  # run-averaged to the goal, raw and (under Adam) preconditioned
                steps = [p.step for p in best.curve]
                b_simple = run_mean(steps, [p.b_simple for p in best.curve], c.steps)
                pre = run_mean(steps, [p.b_simple_preconditioned for p in best.curve], c.steps)
            rows.append(
                {
                    "metric": goal.metric,
                    "goal": goal.level,
                    "batch_size": b,
                    "steps": c.steps,
                    "steps_low": c.low if c.reached else c.steps,
                    "steps_high": c.high if c.reached else c.steps,
                    "reached": c.reached,
                    "run": best.name,
                    "lr": best.lr,
                    "b_simple": b_simple,
                    "b_simple_preconditioned": pre,
                    "unit": best.unit,
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


class SweepResult(NamedTuple):
    """What :func:`run_sweep` and :func:`write_results` return."""

    config: SweepConfig
    records: dict[RunSpec, RunRecord]  # every finished run
    table: pd.DataFrame  # results.csv
    report: FitReport  # fit.json: the fit per goal, B_simple next to it, B_crit(L), the unit
    files: list[Path]  # results.csv, fit.json and the plots
    trained: int  # runs trained by this call (0: everything was there)


def write_results(
    config: SweepConfig,
    out: str | Path,
    records: dict[RunSpec, RunRecord],
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
) -> SweepResult:
    """Rebuild ``results.csv``, then ``fit.json`` and the plots from it, as ``noisescale fit`` would.

    Each metric gets its own pair of plots: ``pareto.png`` and ``b_crit.png`` for the
    training-loss goals, ``pareto_test_error.png`` and ``b_crit_test_error.png`` for the
    test-error goals.

    Raises:
        SweepDataError: if there is no finished run, or a goal is met at step 0.
    """
    out = Path(out)
    if not records:
        raise SweepDataError(f"{out}: no finished run yet; run the sweep (re-running it resumes)")
    table = results_table(config, records)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    settings = FitSettings(n_bootstrap=n_bootstrap, confidence=confidence)
    report = report_from_file(out / "results.csv", settings=settings)
    files = [out / "results.csv", *plot_report(report, out, "")]
    write_json(out / "fit.json", report.to_json())
    return SweepResult(config, records, table, report, [*files, out / "fit.json"], 0)


def run_sweep(
    config: SweepConfig,
    out: str | Path,
    *,
    jobs: int = 1,
    on_record: Callable[[RunSpec, RunRecord], None] | None = None,
    on_plan: Callable[[list[RunSpec]], None] | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    executor: Executor = "local",
    address: str | None = None,
) -> SweepResult:
    """Run (or resume) a sweep in ``out``, then fit it and write its results and plots.

    Args:
        config: the sweep.
        out: its directory (created; a directory of another sweep is refused). Under Ray, on
            storage every worker sees at the same path.
        jobs: parallel processes (``executor="local"``).
        on_record: called with every run finished by this call.
        on_plan: called with the runs of every round before they start (the initial grid,
            then each widening round).
        n_bootstrap: bootstrap resamples of the fit's intervals.
        confidence: level of the intervals and bounds.
        executor: ``"local"`` processes or ``"ray"`` tasks
            (:func:`~noisescale.experiments.sweep.run.execute_runs`).
        address: the Ray cluster's address (``executor="ray"``).

    Returns:
        The records, the table, the fit report and the files written.

    Raises:
        SweepConfigError: before any training, if ``n_bootstrap`` or ``confidence`` is invalid
            (see :func:`noisescale.critical.fit.check_fit_settings`) or ``out`` cannot hold this sweep.
    """
    try:
        check_fit_settings(n_bootstrap=n_bootstrap, confidence=confidence)
    except ValueError as exc:
        raise SweepConfigError(str(exc)) from None
    prepare_sweep_dir(out, config)
    records = load_records(out, config)
    trained = 0
    while todo := plan_next(config, records):
        if on_plan is not None:
            on_plan(todo)
        new = execute_runs(
            config, todo, str(out), jobs=jobs, on_record=on_record, executor=executor, address=address
        )
        records.update(new)
        trained += len(new)
    result = write_results(config, out, records, n_bootstrap=n_bootstrap, confidence=confidence)
    return result._replace(trained=trained)
