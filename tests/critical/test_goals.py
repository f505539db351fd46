"""The one steps-to-goal rule: interpolated crossings, their brackets, censoring, run averages."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from noisescale.critical.goals import GoalCrossing, RunOutcome, crossing, fastest, run_mean
from noisescale.critical.report import FitSettings, fit_sweep
from noisescale.critical.sweepdata import steps_to_goal
from noisescale.errors import SweepDataError


def test_power_law_curve_is_interpolated_exactly() -> None:
    # L(s) = 2 (100/s)^0.7 meets 1.0 at s = 100 * 2^(1/0.7) = 269.2; logged every 50 steps.
    steps = np.arange(0, 1001, 50.0)
    loss = 2 * (100 / np.maximum(steps, 1e-9)) ** 0.7
    c = crossing(steps, loss.tolist(), 1.0)
    assert c.reached and (c.low, c.high) == (250.0, 300.0)
    assert c.steps == pytest.approx(100 * 2 ** (1 / 0.7), rel=1e-12)


def test_censored_nan_and_step_zero() -> None:
    assert crossing([0, 10, 20], [3.0, 2.5, 2.1], 2.0) == GoalCrossing(20.0, 20.0, math.inf, False)
    # A diverged run (NaN) never reaches the goal; None is a check that did not measure it.
    assert not crossing([0, 10, 20], [3.0, float("nan"), None], 2.0).reached
    with pytest.raises(SweepDataError, match="met at step 0"):
        crossing([0, 10], [1.0, 0.5], 2.0)
    first = crossing([50, 100], [1.0, 0.5], 2.0)  # already below at the first log: in (0, 50]
    assert first == GoalCrossing(50.0, 0.0, 50.0, True)


def test_fastest_run_then_the_censoring_rule() -> None:
    hit, miss = GoalCrossing(80.0, 70.0, 90.0, True), GoalCrossing(300.0, 300.0, math.inf, False)
    assert fastest([RunOutcome(miss, "budget"), RunOutcome(hit, "goals")]) == 1
    short_diverged = GoalCrossing(20.0, 20.0, math.inf, False)
    short_stalled = GoalCrossing(40.0, 40.0, math.inf, False)
    # Neither reached: a diverged or stalled run bounds nothing while a run ran to its end.
    runs = [
        RunOutcome(short_diverged, "diverged"),
        RunOutcome(short_stalled, "stalled"),
        RunOutcome(miss, "end"),
    ]
    assert fastest(runs) == 2
    assert fastest(runs[:2]) == 1  # else the runs that did not diverge
    assert fastest(runs[:1]) == 0  # else all of them


def test_run_mean_is_step_weighted_to_the_crossing() -> None:
    # Checks at 0, 10, 100: the value at 100 stands for 90 steps, the one at 10 for 10.
    assert run_mean([0, 10, 100], [None, 1.0, 2.0], upto=100) == pytest.approx((10 + 180) / 100)
    assert run_mean([0, 10, 100], [None, 1.0, 2.0], upto=55) == pytest.approx((10 + 90) / 55)
    assert run_mean([0, 10], [None, None], upto=10) is None


# A synthetic sweep with known S_min and B_crit whose losses are logged every 50 steps
# (issue 13 #6). Each batch size's curve L(s) = 0.5 + 0.5 (S/s)^0.7 meets the goal 1.0 exactly at
# its steps-to-goal S = S_min (1 + B_crit/B), times 5% log-normal scatter.
S_MIN, B_CRIT, EVERY = 100.0, 500.0, 50
BATCHES = np.array([16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
SWEEPS = 200


def coarse_sweep(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    truth = S_MIN * (1 + B_CRIT / BATCHES) * np.exp(rng.normal(0.0, 0.05, BATCHES.size))
    rows = []
    for b, s in zip(BATCHES, truth, strict=True):
        steps = np.arange(0, 3 * s + EVERY, EVERY)
        loss = 0.5 + 0.5 * (s / np.maximum(steps, 1e-9)) ** 0.7
        for t, v in zip(steps, loss, strict=True):
            rows.append({"batch_size": float(b), "step": t, "loss": v, "run": f"b{b}", "lr": np.nan,
                         "b_simple": np.nan, "unit": None, "_line": 0})  # fmt: skip
    return steps_to_goal(pd.DataFrame(rows), [1.0])


def test_coarse_logging_widens_the_interval_instead_of_biasing_b_crit() -> None:
    # The old rule (first logged step at or below the goal) put B_crit 27% low here with 29%
    # coverage of the 95% interval. Interpolation leaves a small shape error (the chord of a
    # curve over one logging interval) and the bootstrap draws each crossing within its bracket.
    fits = [fit_sweep(coarse_sweep(seed), FitSettings(n_bootstrap=200))[0].fit for seed in range(SWEEPS)]
    log_err = np.log([f.b_crit_fit / B_CRIT for f in fits])
    half_width = np.mean([np.log(f.b_crit_ci[1] / f.b_crit_ci[0]) / 2 for f in fits])
    covered = np.mean([f.b_crit_ci[0] <= B_CRIT <= f.b_crit_ci[1] for f in fits])
    # Coverage: at least the nominal 95% less 3 binomial standard errors at 200 sweeps (0.046).
    assert covered >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / SWEEPS)
    # Unbiased: the mean log error is within 3 standard errors of 0, up to the interpolation
    # error, which is bounded by the logging interval: at most a tenth of the interval's half-width.
    se = log_err.std(ddof=1) / math.sqrt(SWEEPS)
    assert abs(log_err.mean()) <= 3 * se + 0.1 * half_width
    # The old bias (-0.31 in log) would fail both bounds by far: 0.31 > 3 se + 0.1 half-width.
    assert 3 * se + 0.1 * half_width < 0.1
