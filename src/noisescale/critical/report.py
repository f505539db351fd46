"""The fit report of a sweep table: one fit per goal, B_simple next to it, B_crit(L), one JSON schema.

``noisescale sweep`` writes its ``fit.json`` with :func:`report_from_file` on the very
``results.csv`` it has just written, and ``noisescale fit FILE --json`` prints
:meth:`FitReport.to_json` of the same function, so the two agree by construction (with the same
``--bootstrap``, ``--confidence``, ``--max-increase`` and ``--seed``, which the report records).

Per goal (a level of one metric: ``loss``, ``train_loss``, ``test_error``...) the report holds
the hyperbola fit of :func:`noisescale.critical.fit.fit_critical_batch` and the run-averaged
B_simple of the batch sizes that reached the goal (median, min, max). Across goals it fits
``B_crit(L) = B*/L^(1/alpha_B)`` (Kaplan et al. 2020, eq. 5.3) to the bracketed goals of *one
loss metric* only: a test-error level is not a loss, and goals of two metrics are never mixed.

The JSON schema (non-finite numbers are written as null)::

    {"unit": "images",                         # what every batch size counts
     "settings": {"n_bootstrap", "confidence", "max_increase", "seed"},
     "goals": [{"metric", "goal", "n_batch_sizes",
                <CriticalBatchFit.to_dict() fields> | "error",
                "b_simple": {"median", "min", "max"} | null, "b_simple_over_b_crit",
                "b_simple_preconditioned": {...} | null, "b_simple_preconditioned_over_b_crit"}],
     "power_law": {"metric", "b_star", "alpha_b", "goals"} | null,
     "power_law_note": why there is none, or null}

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    appendix A.2-A.3 and Table 1. Kaplan et al. (2020), Scaling Laws for Neural Language
    Models, arXiv:2001.08361, eq. 5.3.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from noisescale.critical.fit import CriticalBatchFit, check_fit_settings, fit_critical_batch
from noisescale.critical.predict import BCritPowerLaw, fit_b_crit_power_law
from noisescale.critical.sweepdata import load_sweep, table_unit
from noisescale.errors import SweepDataError

__all__ = [
    "DEFAULT_SETTINGS",
    "DEFAULT_UNIT",
    "BSimpleRange",
    "FitReport",
    "FitSettings",
    "GoalFit",
    "fit_report",
    "fit_sweep",
    "is_loss_metric",
    "power_law_of",
    "report_from_file",
]

DEFAULT_UNIT = "examples"  # the unit of a file that does not say


class BSimpleRange(NamedTuple):
    """Run-averaged B_simple over the batch sizes that reached a goal, in the batch-size unit."""

    median: float
    min: float
    max: float


class GoalFit(NamedTuple):
    """The fit for one goal, or why there is none."""

    metric: str  # what the goal is a level of ("loss", "train_loss", "test_error"...)
    goal: float | None  # the level (None: the file has a single, unnamed goal)
    fit: CriticalBatchFit | None  # None when `error` is set
    error: str | None  # the SweepDataError message
    points: pd.DataFrame  # this goal's rows of the sweep table (sweepdata.COLUMNS)
    b_simple: BSimpleRange | None  # None when no run that reached the goal measured it
    b_simple_preconditioned: BSimpleRange | None = None  # the preconditioned one (under Adam)

    @property
    def ratio(self) -> float | None:
        """Median run-averaged B_simple over B_crit; None unless both exist (B_crit bracketed)."""
        return self._over_b_crit(self.b_simple)

    @property
    def ratio_preconditioned(self) -> float | None:
        """Median run-averaged preconditioned B_simple over B_crit; None unless both exist."""
        return self._over_b_crit(self.b_simple_preconditioned)

    def _over_b_crit(self, b: BSimpleRange | None) -> float | None:
        if self.fit is None or self.fit.b_crit is None or b is None:
            return None
        return b.median / self.fit.b_crit


class FitSettings(NamedTuple):
    """The settings of :func:`noisescale.critical.fit.fit_critical_batch` a report was made with."""

    n_bootstrap: int = 1000
    confidence: float = 0.95
    max_increase: float = 1.5
    seed: int = 0


DEFAULT_SETTINGS = FitSettings()


class FitReport(NamedTuple):
    """Every goal's fit, B_simple next to it, and B_crit(L) across the goals of one loss metric."""

    unit: str  # what a batch size counts: images, tokens, observations, examples
    settings: FitSettings
    goals: list[GoalFit]  # in table order
    power_law: BCritPowerLaw | None
    power_law_metric: str | None  # the loss metric the law was fitted on
    power_law_note: str | None  # why there is no law, when there are loss goals to fit it on

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (see the module docstring for the schema)."""
        law = None
        if self.power_law is not None:
            used = [goal for goal, _ in _law_points(self.goals, self.power_law_metric)]
            law = {
                "metric": self.power_law_metric,
                "b_star": self.power_law.b_star,
                "alpha_b": self.power_law.alpha_b,
                "goals": used,
            }
        return {
            "unit": self.unit,
            "settings": self.settings._asdict(),
            "goals": [_goal_json(g) for g in self.goals],
            "power_law": law,
            "power_law_note": self.power_law_note,
        }


def _goal_json(g: GoalFit) -> dict[str, Any]:
    entry: dict[str, Any] = {"metric": g.metric, "goal": g.goal, "n_batch_sizes": len(g.points)}
    entry.update(g.fit.to_dict() if g.fit is not None else {"error": g.error})
    entry["b_simple"] = None if g.b_simple is None else g.b_simple._asdict()
    entry["b_simple_over_b_crit"] = g.ratio
    pre = g.b_simple_preconditioned
    entry["b_simple_preconditioned"] = None if pre is None else pre._asdict()
    entry["b_simple_preconditioned_over_b_crit"] = g.ratio_preconditioned
    return entry


def is_loss_metric(metric: str) -> bool:
    """Whether goals of ``metric`` are loss levels (``loss``, ``train_loss``, ``test_loss``...).

    Examples:
        >>> is_loss_metric("train_loss"), is_loss_metric("loss"), is_loss_metric("test_error")
        (True, True, False)
    """
    return metric == "loss" or metric.endswith("_loss")


def fit_sweep(table: pd.DataFrame, settings: FitSettings = DEFAULT_SETTINGS) -> list[GoalFit]:
    """Fit the hyperbola for every (metric, goal) of a sweep table.

    Args:
        table: rows with the columns of :data:`noisescale.critical.sweepdata.COLUMNS`.
        settings: bootstrap resamples, confidence, tolerated rise of steps, seed.

    Returns:
        One GoalFit per goal, in table order; a goal the data cannot fit carries the message
        of its SweepDataError instead of a fit.
    """
    out = []
    key = table["metric"] + "\0" + table["goal"].fillna(-np.inf).map(repr)
    for k in pd.unique(key):
        points = table[key == k].reset_index(drop=True)
        level = float(points["goal"].iloc[0])
        goal = None if np.isnan(level) else level
        try:
            fit = fit_critical_batch(
                points["batch_size"],
                points["steps"],
                reached=points["reached"].to_numpy(bool),
                steps_low=points["steps_low"],
                steps_high=points["steps_high"],
                **settings._asdict(),
            )
            error = None
        except SweepDataError as exc:
            fit, error = None, str(exc)
        ranges = _b_simple(points), _b_simple(points, "b_simple_preconditioned")
        out.append(GoalFit(str(points["metric"].iloc[0]), goal, fit, error, points, *ranges))
    return out


def _b_simple(points: pd.DataFrame, column: str = "b_simple") -> BSimpleRange | None:
    """Median, min and max of the B_simple (``column``) of the rows that reached the goal."""
    v = points.loc[points["reached"].to_numpy(bool), column].to_numpy(float)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    return BSimpleRange(float(np.median(v)), float(v.min()), float(v.max()))


def _law_points(goal_fits: Sequence[GoalFit], metric: str | None) -> list[tuple[float, float]]:
    """``(goal, B_crit)`` of the goals of ``metric`` the power law is fitted on: bracketed, positive level."""
    return [
        (g.goal, g.fit.b_crit)
        for g in goal_fits
        if g.metric == metric and g.fit is not None and g.fit.b_crit is not None and g.goal and g.goal > 0
    ]


def power_law_of(goal_fits: Sequence[GoalFit]) -> tuple[BCritPowerLaw | None, str | None, str | None]:
    """``B_crit(L)`` across the bracketed goals of the first loss metric (Kaplan et al. 2020, eq. 5.3).

    Returns:
        ``(law, metric, note)``: the law and its metric, or None and why not (the note is None
        when there is nothing to fit: fewer than two goals of a loss metric).
    """
    metric = next((g.metric for g in goal_fits if is_loss_metric(g.metric)), None)
    if metric is None or sum(g.metric == metric for g in goal_fits) < 2:
        return None, None, None
    used = _law_points(goal_fits, metric)
    try:
        law = fit_b_crit_power_law([goal for goal, _ in used], [b_crit for _, b_crit in used])
    except SweepDataError as exc:
        return None, None, str(exc)
    return law, metric, None


def fit_report(
    table: pd.DataFrame, *, unit: str | None = None, settings: FitSettings = DEFAULT_SETTINGS
) -> FitReport:
    """Fit every goal of a sweep table and B_crit(L) across its loss goals.

    Args:
        table: rows with the columns of :data:`noisescale.critical.sweepdata.COLUMNS`.
        unit: what a batch size counts; None takes the table's ``unit`` column, else ``examples``.
        settings: the fit's settings.

    Returns:
        FitReport.

    Raises:
        SweepDataError: if ``unit`` contradicts the table's unit column, or the table has several.
        ValueError: on bad settings (see :func:`noisescale.critical.fit.check_fit_settings`).
    """
    check_fit_settings(
        n_bootstrap=settings.n_bootstrap, confidence=settings.confidence, max_increase=settings.max_increase
    )
    said = table_unit(table)
    if unit is not None and said is not None and unit != said:
        raise SweepDataError(
            f"the file gives batch sizes in {said}, not {unit}: drop --unit or give --unit {said}"
        )
    goal_fits = fit_sweep(table, settings)
    law, metric, note = power_law_of(goal_fits)
    return FitReport(unit or said or DEFAULT_UNIT, settings, goal_fits, law, metric, note)


def report_from_file(
    path: str | Path,
    goals: Sequence[float] | None = None,
    *,
    unit: str | None = None,
    settings: FitSettings = DEFAULT_SETTINGS,
) -> FitReport:
    """:func:`fit_report` of a sweep file read by :func:`noisescale.critical.sweepdata.load_sweep`.

    The one path from a file to a report, for ``noisescale fit`` and for ``noisescale sweep``
    (which reads back the ``results.csv`` it wrote), so that both give the same report.

    Raises:
        SweepDataError: on a bad file (naming it and the line) or a unit it contradicts.
        ValueError: on bad settings.
    """
    return fit_report(load_sweep(path, goals), unit=unit, settings=settings)
