"""Tests of the critical-batch fit (McCandlish et al. 2018, eqs. 2.11-2.12, appendices A.3, D)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import integrate

from noisescale._format import format_batch
from noisescale.critical.fit import CriticalBatchFit, fit_critical_batch
from noisescale.errors import SweepDataError

S_MIN, B_CRIT = 1000.0, 500.0
GRID = 2.0 ** np.arange(3, 15)  # 8 .. 16384: brackets B_CRIT by ~6 doublings on each side


def hyperbola(b: np.ndarray, s_min: float = S_MIN, b_crit: float = B_CRIT) -> np.ndarray:
    return s_min * (1.0 + b_crit / b)


def noisy(b: np.ndarray, seed: int, sd: float = 0.05) -> np.ndarray:
    """Steps with log-normal scatter of `sd` (5% by default) per run."""
    return hyperbola(b) * np.exp(np.random.default_rng(seed).normal(0.0, sd, b.size))


def test_exact_hyperbola_is_recovered_exactly() -> None:
    fit = fit_critical_batch(GRID, hyperbola(GRID), n_bootstrap=200)
    # Noise-free data: only floating-point and solver tolerances (1e-12) remain.
    assert fit.b_crit == pytest.approx(B_CRIT, rel=1e-8)
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-8)
    assert fit.e_min == pytest.approx(S_MIN * B_CRIT, rel=1e-8)
    assert fit.bracketed and fit.bound is None
    assert fit.residual_sd < 1e-8
    assert (fit.n_points, fit.n_censored) == (GRID.size, 0)
    assert fit.batch_range == (8.0, 16384.0)


def test_fit_is_invariant_to_input_order() -> None:
    s = noisy(GRID, seed=3)
    perm = np.random.default_rng(0).permutation(GRID.size)
    a, b = fit_critical_batch(GRID, s), fit_critical_batch(GRID[perm], s[perm])
    assert a == b


def test_recovery_single_seed_within_interval_and_predicted_error() -> None:
    fit = fit_critical_batch(GRID, noisy(GRID, seed=11))
    assert fit.b_crit_ci[0] <= B_CRIT <= fit.b_crit_ci[1]
    assert fit.s_min_ci[0] <= S_MIN <= fit.s_min_ci[1]
    assert fit.e_min_ci[0] <= S_MIN * B_CRIT <= fit.e_min_ci[1]
    # Linearised standard error of log B_crit for 5% scatter: sd * sqrt([(J^T J)^-1]_cc), with
    # J the Jacobian of log S in (log S_min, log B_crit) at the truth. 4 se is a 1-in-15000 event.
    jac = np.stack([np.ones_like(GRID), 1.0 / (1.0 + GRID / B_CRIT)], axis=1)
    se = 0.05 * np.sqrt(np.linalg.inv(jac.T @ jac)[1, 1])
    assert abs(np.log(fit.b_crit / B_CRIT)) < 4 * se
    assert fit.residual_sd == pytest.approx(0.05, rel=0.5)  # 10 dof: inside with probability 0.98


def test_interval_coverage_with_five_percent_lognormal_noise() -> None:
    # Each sweep: 8 batch sizes 16..2048 around B_crit = 256, 5% log-normal scatter. At the
    # nominal 95% level (the module docstring reports 0.95/0.93 for B_crit/S_min over 300
    # sweeps) at least 34 of 40 must cover; P(X <= 33) for Binomial(40, 0.93) is 0.02.
    b = 2.0 ** np.arange(4, 12)
    covered_b = covered_s = 0
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        s = 1000.0 * (1 + 256.0 / b) * np.exp(rng.normal(0.0, 0.05, b.size))
        fit = fit_critical_batch(b, s, n_bootstrap=400, seed=seed)
        covered_b += fit.b_crit_ci[0] <= 256.0 <= fit.b_crit_ci[1]
        covered_s += fit.s_min_ci[0] <= 1000.0 <= fit.s_min_ci[1]
    assert covered_b >= 34
    assert covered_s >= 34


def test_twenty_points_thousand_resamples_under_five_seconds() -> None:
    b = np.geomspace(8, 65536, 20)
    s = 1000.0 * (1 + 2000.0 / b) * np.exp(np.random.default_rng(1).normal(0.0, 0.05, 20))
    fit_critical_batch(b, s, n_bootstrap=100)  # warm up imports and caches
    start = time.perf_counter()
    fit = fit_critical_batch(b, s, n_bootstrap=1000)
    assert time.perf_counter() - start < 5.0
    assert fit.bracketed


# --- Appendix D: B_noise varying along training still gives an exact hyperbola ---------------

L_START, L_GOAL = 4.0, 1.0


def delta_l_max(loss: float) -> float:
    """Best per-step progress (eq. 2.7's ΔL_max), shrinking as the loss falls."""
    return 0.01 * loss**2


def b_noise(loss: float) -> float:
    """B_noise rises 16x over the run (the paper: an order of magnitude or more)."""
    return 100.0 * (L_START / loss) ** 2


def steps_to_goal(batch: float) -> float:
    """Integrate dL/ds = -ΔL_max(L) / (1 + B_noise(L)/B) (eq. 2.7) until L reaches the goal."""

    def reached(_s: float, loss: np.ndarray) -> float:
        return loss[0] - L_GOAL

    reached.terminal = True  # type: ignore[attr-defined]
    inf = np.isinf(batch)
    sol = integrate.solve_ivp(
        lambda _s, loss: -delta_l_max(loss) / (1.0 + (0.0 if inf else b_noise(loss) / batch)),
        (0.0, 1e9),
        [L_START],
        events=reached,
        rtol=1e-11,
        atol=1e-12,
        method="DOP853",
        dense_output=True,
    )
    return float(sol.t_events[0][0]), sol.sol


def test_appendix_d_varying_noise_scale_gives_exact_hyperbola() -> None:
    batches = 2.0 ** np.arange(2, 16)
    steps = np.array([steps_to_goal(b)[0] for b in batches])
    examples = batches * steps
    # S_min: the B -> infinity run; B_crit: B_noise averaged over its steps (appendix D).
    s_min, path = steps_to_goal(np.inf)
    mean_noise = integrate.quad(lambda s: b_noise(path(s)[0]), 0.0, s_min, epsrel=1e-11)[0] / s_min
    e_min = mean_noise * s_min
    # The ODE is solved to rtol 1e-11, so the identity holds to ~1e-8.
    np.testing.assert_allclose((steps / s_min - 1) * (examples / e_min - 1), 1.0, rtol=1e-7)
    fit = fit_critical_batch(batches, steps, n_bootstrap=200)
    assert fit.b_crit == pytest.approx(mean_noise, rel=1e-6)
    assert fit.s_min == pytest.approx(s_min, rel=1e-6)
    # Not trivially constant: B_noise spans 100..1600, and B_crit (700) is neither end nor the
    # plain average over the loss range.
    plain = integrate.quad(b_noise, L_GOAL, L_START)[0] / (L_START - L_GOAL)
    assert mean_noise == pytest.approx(700.0, rel=1e-6)
    assert abs(plain / mean_noise - 1) > 0.3


# --- censoring ------------------------------------------------------------------------------


def test_budget_censored_runs_are_lower_bounds_not_points() -> None:
    # A 20000-step budget: batch sizes 8 and 16 (true 63500 and 32250 steps) stop at 20000.
    s_true = noisy(GRID, seed=3)
    reached = s_true < 20000
    s_obs = np.minimum(s_true, 20000.0)
    assert (~reached).sum() == 2
    fit = fit_critical_batch(GRID, s_obs, reached=reached)
    assert fit.n_censored == 2 and fit.n_points == GRID.size
    assert fit.b_crit_ci[0] <= B_CRIT <= fit.b_crit_ci[1]
    # The same stops read as "reached" drag B_crit far down and the scatter up.
    naive = fit_critical_batch(GRID, s_obs)
    assert naive.b_crit < fit.b_crit_ci[0]
    assert naive.residual_sd > 3 * fit.residual_sd


def test_censored_run_constrains_the_curve() -> None:
    # Four reached runs far above B_crit hardly pin it; a run at 64 that stopped at 8000 steps
    # without reaching the goal says S(64) > 8000 (true: 8812).
    b = np.array([64.0, 1024, 2048, 4096, 8192])
    s = noisy(b, seed=3)
    s[0] = 8000.0
    reached = np.array([False, True, True, True, True])
    censored = fit_critical_batch(b, s, reached=reached)
    alone = fit_critical_batch(b[1:], s[1:])
    s64 = censored.s_min * (1 + censored.b_crit_fit / 64)
    assert alone.s_min * (1 + alone.b_crit_fit / 64) < 0.9 * 8000  # violates the observation
    assert s64 > 0.97 * 8000  # quadratic penalty: met up to the scatter of the runs
    assert censored.b_crit_ci[0] > 10 * alone.b_crit_ci[0]
    assert censored.b_crit_ci[0] <= B_CRIT <= censored.b_crit_ci[1]


# --- bracketing -----------------------------------------------------------------------------


def test_perfect_scaling_sweep_reports_lower_bound_not_value() -> None:
    b = 2.0 ** np.arange(4, 13)  # 16..4096, true B_crit = 1e6: steps ~ 1/B throughout
    s = 50.0 * (1 + 1e6 / b) * np.exp(np.random.default_rng(2).normal(0, 0.05, b.size))
    fit = fit_critical_batch(b, s)
    assert not fit.bracketed and fit.b_crit is None
    assert fit.bound is not None and fit.bound.startswith("B_crit > ")
    assert fit.bound_value <= 4096  # never claims more than the grid shows
    assert fit.bound == f"B_crit > {format_batch(fit.bound_value)}"
    d = fit.to_dict()
    assert d["b_crit"] is None and d["bracketed"] is False
    assert d["b_crit_ci"] == [fit.bound_value, None]
    # E_min stays well determined (E ~ E_min for B << B_crit).
    assert fit.e_min_ci[1] / fit.e_min_ci[0] < 1.3


def test_saturated_sweep_reports_upper_bound() -> None:
    b = 2.0 ** np.arange(8, 15)  # 256..16384 with true B_crit = 4: steps ~ S_min throughout
    s = 1000.0 * (1 + 4.0 / b) * np.exp(np.random.default_rng(4).normal(0, 0.05, b.size))
    fit = fit_critical_batch(b, s)
    assert not fit.bracketed and fit.b_crit is None
    assert fit.bound is not None and fit.bound.startswith("B_crit < ")
    assert fit.bound_value >= 256
    assert fit.to_dict()["b_crit_ci"] == [None, fit.bound_value]
    assert fit.s_min_ci[0] <= 1000.0 <= fit.s_min_ci[1]


def test_to_dict_has_the_json_fields() -> None:
    d = fit_critical_batch(GRID, noisy(GRID, seed=1), n_bootstrap=200).to_dict()
    for key in ("b_crit", "b_crit_ci", "s_min", "e_min", "n_points", "bracketed", "bound", "n_censored"):
        assert key in d
    assert d["b_crit_ci"][0] < d["b_crit"] < d["b_crit_ci"][1]
    assert isinstance(CriticalBatchFit._fields, tuple)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "s", "reached", "match"),
    [
        pytest.param([16, 64], [100, 50], None, "at 2 batch size", id="two_points"),
        pytest.param([16, 64, 256, 1024], [900, 400, 300, 250], [True, True, False, False], "at 2 batch",
                     id="two_reached_plus_censored"),
        pytest.param([16, 64, 0], [100, 50, 40], None, "positive", id="zero_batch"),
        pytest.param([16, 64, 256], [100, -5, 40], None, "positive", id="negative_steps"),
        pytest.param([16, 64, 256], [100, np.nan, 40], None, "positive", id="nan_steps"),
        pytest.param([16, 64, 64, 256], [100, 60, 50, 40], None, r"64 \(2 runs\)", id="duplicate"),
        pytest.param([16, 64, 256], [100, 50], None, "different lengths", id="lengths"),
    ],
)  # fmt: skip
def test_bad_sweeps_raise_clear_errors(b: list, s: list, reached: list | None, match: str) -> None:
    with pytest.raises(SweepDataError, match=match):
        fit_critical_batch(b, s, reached=reached)


def test_non_monotone_steps_name_the_points() -> None:
    b = [16, 64, 256, 1024, 4096]
    s = [3000, 1200, 700, 1400, 500]  # 1024 needs 2x the steps of 256
    with pytest.raises(SweepDataError, match=r"batch 1024 needs 1400 steps but batch 256 reached it in 700"):
        fit_critical_batch(b, s)


def test_censored_large_batch_beyond_a_faster_small_batch_is_non_monotone() -> None:
    b, s = [16, 64, 256, 1024], [3000, 1200, 700, 5000]
    with pytest.raises(SweepDataError, match="batch 1024 did not reach the goal in 5000 steps"):
        fit_critical_batch(b, s, reached=[True, True, True, False])


def test_scatter_within_tolerance_is_accepted() -> None:
    # Saturated regime: a 30% bump (inside the 1.5x tolerance) is scatter, not an error.
    b = [16, 64, 256, 1024, 4096]
    s = [3000, 1300, 1000, 1300, 1000]
    assert fit_critical_batch(b, s, n_bootstrap=200).n_points == 5
    with pytest.raises(SweepDataError, match=r"tolerance 1\.2x"):
        fit_critical_batch(b, s, max_increase=1.2)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_bootstrap": 10}, "n_bootstrap"),
        ({"confidence": 1.0}, "confidence"),
        ({"confidence": np.nan}, "confidence"),
        ({"max_increase": -1.0}, "max_increase` >= 1"),  # was an IndexError
        ({"max_increase": 0.5}, "max_increase` >= 1"),
        ({"max_increase": np.nan}, "max_increase` >= 1"),
    ],
)
def test_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_critical_batch(GRID, hyperbola(GRID), **kw)


def test_infinite_max_increase_turns_the_monotonicity_check_off() -> None:
    b = [16, 64, 256, 1024, 4096]
    s = [1000 * (1 + 500 / x) for x in b]
    s[-1] *= 3  # far beyond the default tolerance
    with pytest.raises(SweepDataError, match="steps increase"):
        fit_critical_batch(b, s, n_bootstrap=100)
    assert fit_critical_batch(b, s, n_bootstrap=100, max_increase=np.inf).n_points == 5


def test_format_batch_keeps_bounds_true() -> None:
    assert format_batch(4096.0) == "4096"
    assert format_batch(2873.4, "down") == "2870"
    assert format_batch(2873.4, "up") == "2880"
    assert format_batch(3.2e8) == "3.2e+08"
