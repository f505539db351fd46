"""Steps to a goal from a logged curve: the one rule of the sweep and of ``noisescale fit``.

A run is checked (or logs its loss) at steps ``s_0 < s_1 < ...``; the goal is reached at the
first logged step whose value is at or below the goal level (at or above it for a metric where
higher is better, :data:`HIGHER_IS_BETTER`: an RL agent's mean return). The crossing itself lies between
the last logged step above the goal and that step: it is an *interval-censored* observation,
``S in (s_{j-1}, s_j]``. This module returns

* the point estimate: the crossing interpolated between the two logged points, linearly in
  ``log value`` against ``log step`` (a power law in steps, the shape of training curves,
  Kaplan et al. 2020, eq. 5.6, is interpolated exactly), or linearly in ``value`` against
  ``step`` where a logarithm is undefined (step 0, values <= 0);
* the bracket ``(low, high]``, which :func:`noisescale.critical.fit.fit_critical_batch` uses
  to widen its intervals by the logging interval (each bootstrap resample draws the crossing
  within its bracket), so coarse logging widens the interval instead of biasing it.

Taking the first logged step instead (the rule ``noisescale fit`` had) overstates the steps by
up to one logging interval, most at the largest batch sizes (fewest steps): with a loss logged
every 50 steps it put B_crit 14-26% low with intervals that excluded the truth (issue 13 #6).

A run that never reaches the goal is *censored* at its last logged step: its steps to the goal
exceed that. Of several runs at one batch size (a learning-rate grid), :func:`fastest` keeps
the fastest that reached the goal (McCandlish et al. 2018, appendix A.2); if none did, the
batch size is censored at the fewest steps of the runs that ran to their end (a run that
diverged or was stopped as hopeless would never reach the goal, so it bounds nothing), else
of the runs that did not diverge, else of all of them.

The run-averaged B_simple to a goal, :func:`run_mean`, is the step-weighted mean of the
logged (smoothed, resolved) values up to the crossing (McCandlish et al. 2018, appendix D:
B_crit is an average of B_noise over the steps).

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    appendix A.2-A.3 and D.
    Kaplan et al. (2020), Scaling Laws for Neural Language Models, arXiv:2001.08361, eq. 5.6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from noisescale.errors import SweepDataError

__all__ = [
    "ENDED",
    "HIGHER_IS_BETTER",
    "GoalCrossing",
    "RunOutcome",
    "crossing",
    "fastest",
    "meets",
    "run_mean",
]

ENDED = ("end", "budget", "goals")  # ways a run stops that leave its censoring bound valid
HIGHER_IS_BETTER = frozenset({"mean_return"})  # metrics whose goals are reached from below


def meets(metric: str, value: float, level: float) -> bool:
    """Whether ``value`` of ``metric`` reaches the goal ``level`` (``<=``, or ``>=`` if higher is better).

    Example:
        >>> meets("train_loss", 0.1, 0.2), meets("mean_return", 480.0, 475.0)
        (True, True)
    """
    return value >= level if metric in HIGHER_IS_BETTER else value <= level


class GoalCrossing(NamedTuple):
    """Where one run reached one goal, or how far it ran without reaching it.

    ``reached``: the crossing lies in ``(low, high]`` and ``steps`` is its interpolated value.
    Censored: the run ran ``steps`` steps without reaching the goal; ``low == steps`` and
    ``high`` is infinite (its steps to the goal exceed ``steps``).
    """

    steps: float  # steps; interpolated crossing, or the steps run when censored
    low: float  # steps; last logged step above the goal (0 when the first log is already below)
    high: float  # steps; first logged step at or below the goal (inf when censored)
    reached: bool


class RunOutcome(NamedTuple):
    """One run's crossing of one goal, with why it stopped, for :func:`fastest`."""

    crossing: GoalCrossing
    stopped: str  # "end" (a user's curve), "budget", "goals", "diverged" or "stalled"


def crossing(
    steps: Sequence[float], values: Sequence[float | None], level: float, *, above: bool = False
) -> GoalCrossing:
    """Steps to ``level`` from a logged curve, interpolated between the points around the crossing.

    Args:
        steps: logged steps ``[T]``, increasing (0: before the first update).
        values: the metric at each step ``[T]`` (a loss, an error fraction, a mean return); None
            where not measured; NaN or inf (a diverged run) never reaches the goal.
        level: the goal; reached at the first value ``<= level`` (``>= level`` with ``above``).
        above: higher is better (a mean return).

    Returns:
        GoalCrossing: reached with its bracket, or censored at the last logged step.

    Raises:
        SweepDataError: if the goal is met at step 0 (before any update: nothing to count),
            or ``steps`` is empty.

    Examples:
        >>> c = crossing([0, 100, 200], [4.0, 2.0, 1.0], 1.5)  # 2 (100/s) meets 1.5 at s = 133.3
        >>> round(c.steps, 1), c.low, c.high, c.reached
        (133.3, 100.0, 200.0, True)
        >>> crossing([0, 100], [4.0, 2.0], 1.0)
        GoalCrossing(steps=100.0, low=100.0, high=inf, reached=False)
        >>> round(crossing([0, 10, 20], [None, 100.0, 400.0], 200.0, above=True).steps, 3)  # 100 (s/10)^2
        14.142
    """
    if len(steps) == 0:
        raise SweepDataError("a curve with no logged step")
    prev: tuple[float, float] | None = None
    for step, value in zip(steps, values, strict=True):
        if value is None or not math.isfinite(value):
            continue
        if value >= level if above else value <= level:
            if step <= 0:
                raise SweepDataError(
                    f"the goal {level:g} is met at step 0, before any update: choose a lower goal"
                )
            if prev is None:  # the first measured value is already below: somewhere in (0, step]
                return GoalCrossing(float(step), 0.0, float(step), True)
            # A goal is met after a whole number of updates: at least one.
            at = max(_interpolate(prev, (float(step), float(value)), level), min(1.0, float(step)))
            return GoalCrossing(at, prev[0], float(step), True)
        prev = (float(step), float(value))
    last = float(steps[-1])
    return GoalCrossing(last, last, math.inf, False)


def _interpolate(before: tuple[float, float], after: tuple[float, float], level: float) -> float:
    """Step where the curve through two points (value above, at-or-below ``level``) meets ``level``."""
    (s0, v0), (s1, v1) = before, after
    if v1 == level or v0 == v1:
        return s1
    if s0 > 0 and v1 > 0 and level > 0:  # power law in steps through both points
        t = math.log(v0 / level) / math.log(v0 / v1)
        return math.exp(math.log(s0) + t * math.log(s1 / s0))
    return s0 + (s1 - s0) * (v0 - level) / (v0 - v1)


def fastest(outcomes: Sequence[RunOutcome]) -> int:
    """Index of the run that stands for its batch size: the fastest to reach the goal, or the censoring bound.

    Ties go to the earlier run: callers list their runs in order of preference.

    Args:
        outcomes: the runs of one batch size for one goal (at least one).

    Returns:
        The index into ``outcomes``.

    Raises:
        ValueError: if ``outcomes`` is empty.
    """
    if not outcomes:
        raise ValueError("no run to choose from")
    hit = [i for i, o in enumerate(outcomes) if o.crossing.reached]
    if not hit:
        ended = [i for i, o in enumerate(outcomes) if o.stopped in ENDED]
        alive = [i for i, o in enumerate(outcomes) if o.stopped != "diverged"]
        hit = ended or alive or list(range(len(outcomes)))
    return min(hit, key=lambda i: (outcomes[i].crossing.steps, i))


def run_mean(steps: Sequence[float], values: Sequence[float | None], upto: float) -> float | None:
    """Step-weighted mean of a logged quantity over the steps ``(0, upto]``.

    Each logged value stands for the steps since the previous log (the value at step 0, before
    any update, stands for none). None values (e.g. a B_simple that was not resolved) are left
    out, weights and all.

    Args:
        steps: logged steps ``[T]``, increasing.
        values: the quantity at each step ``[T]``, or None.
        upto: last step to include (a crossing may fall between two logs).

    Returns:
        The mean, or None when no value falls in the range.

    Examples:
        >>> run_mean([0, 1, 2, 4], [None, 10.0, 20.0, 40.0], upto=4)  # (10 + 20 + 2 * 40) / 4
        27.5
        >>> run_mean([10, 20], [None, 5.0], upto=15)  # only the 5 steps from 10 to 15 count
        5.0
    """
    total = weight = 0.0
    prev = 0.0
    for step, value in zip(steps, values, strict=True):
        if step <= 0:
            continue
        span = min(step, upto) - prev
        if span <= 0:
            break
        prev = float(step)
        if value is not None and math.isfinite(value):
            total += span * value
            weight += span
    return total / weight if weight > 0 else None
