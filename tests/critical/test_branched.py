"""The branched-training test (Merrill et al. 2025) on synthetic curves whose answer is known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from noisescale.critical.branched import branch_test, check_branch_grid, decide, examples_ratio, smooth

W = 1000.0
MARKS = [100.0 * i for i in range(11)]  # 0 to W
KAPPAS = (1, 2, 4, 8, 16)
B = 10


def power_law(rho: float, a: float = 2.0, alpha: float = 0.5, start: float = 5.0) -> list[float]:
    """A branch that needs ``rho`` times the examples of the base: L(e) = a (e/rho)^-alpha after the start."""
    return [start] + [a * (e / rho) ** -alpha for e in MARKS[1:]]


def hyperbola_rho(kappa: int, b_crit: float) -> float:
    """Examples at kappa B over those at B on E(B) = E_min (1 + B/B_crit) (McCandlish et al. 2018, 2.11)."""
    return (1 + kappa * B / b_crit) / (1 + B / b_crit)


def test_smoothing_keeps_a_line_on_its_line_and_a_divergence_infinite() -> None:
    line = [5.0 - e / 500 for e in MARKS]
    c, s = smooth(MARKS, line, 0.5)
    assert s == pytest.approx([5.0 - x / 500 for x in c], rel=1e-14)
    n = len(MARKS) - 1
    assert c[-1] == pytest.approx(sum(0.5 ** (n - i) * MARKS[i] * (0.5 if i else 1) for i in range(n + 1)))
    _, s = smooth(MARKS[:5], [5.0, 4.0, float("nan"), 3.0, 2.0], 0.5)
    assert s[1] == 4.5 and np.isinf(s[2:]).all()
    _, raw = smooth(MARKS, line, 1.0)
    assert raw.tolist() == line


@pytest.mark.parametrize("rho", [1.0, 1.3, 2.0, 3.7])
def test_examples_ratio_of_power_laws_is_exact(rho: float) -> None:
    c = np.array(MARKS)
    base, slower = np.array(power_law(1.0)), np.array(power_law(rho))
    assert examples_ratio(c, slower, base) == pytest.approx(rho, rel=1e-12)
    assert examples_ratio(c, base, slower) == pytest.approx(1 / rho, rel=1e-12)  # the larger is ahead


def test_examples_ratio_of_no_progress_and_divergence() -> None:
    c = np.array(MARKS)
    base, flat = np.array(power_law(1.0)), np.linspace(5.0, 6.0, len(MARKS))
    assert examples_ratio(c, flat, base) == math.inf
    assert examples_ratio(c, base, flat) == 0.0
    diverged = np.array([5.0, 4.0] + [math.inf] * (len(MARKS) - 2))
    assert examples_ratio(c, diverged, base) == math.inf


@pytest.mark.parametrize("b_crit", [15.0, 35.0, 70.0, 110.0])
def test_examples_tolerance_finds_the_largest_batch_below_b_crit_plus_2b(b_crit: float) -> None:
    # With tau = 1, kappa B keeps up with B exactly when kappa B <= B_crit + 2B (module docstring).
    curves = np.array([power_law(hyperbola_rho(k, b_crit)) for k in KAPPAS])[None]
    result = decide(MARKS, curves, KAPPAS, B, tolerance=1.0, smoothing=1.0)
    expected = max(k * B for k in KAPPAS if k * B <= b_crit + 2 * B)
    assert result.b_crit == expected and result.bound is None and result.b_crit_ci is None
    assert result.test.versus_base == pytest.approx([hyperbola_rho(k, b_crit) for k in KAPPAS], rel=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_smoothed_lines_compare_exactly_at_their_centroids(alpha: float) -> None:
    # L = 5 - e / (100 rho) smooths to the same line; the base reaches the slower branch's final
    # smoothed loss at c_n / rho, which is a centroid c_i when rho = c_n / c_i: no interpolation.
    c, _ = smooth(MARKS, [0.0] * len(MARKS), alpha)
    rhos = [1.0] + [c[-1] / c[i] for i in (8, 6, 4)]
    curves = np.array([[5.0 - e / (100 * r) for e in MARKS] for r in rhos])[None]
    result = decide(MARKS, curves, (1, 2, 4, 8), B, smoothing=alpha)
    assert result.test.versus_base == pytest.approx(rhos, rel=1e-12)
    assert result.test.keeps_up == tuple(r <= 2 for r in rhos)


def test_the_papers_loss_tolerance() -> None:
    finals = [1.000, 1.004, 1.009, 1.012, 1.030]
    curves = np.array([[3.0] * (len(MARKS) - 1) + [f] for f in finals])[None]
    result = decide(MARKS, curves, KAPPAS, B, tolerance=0.01, kind="loss", smoothing=1.0)
    assert result.b_crit == 4 * B and result.test.keeps_up == (True, True, True, False, False)
    assert result.test.versus_base == pytest.approx([0.0, 0.004, 0.009, 0.012, 0.030], abs=1e-12)


def test_largest_that_keeps_up_with_every_smaller_one_even_past_a_failure() -> None:
    rhos = [1.0, 1.5, 2.5, 1.8, 4.0]  # kappa 4 fails against kappa 1; kappa 8 keeps up with all four
    curves = np.array([power_law(r) for r in rhos])[None]
    test = branch_test(np.array(MARKS), curves[0], tolerance=1.0, kind="examples")
    assert test.keeps_up == (True, True, False, True, False) and test.kappa_index == 3


def test_bounds_when_the_grid_does_not_bracket() -> None:
    same = np.array([power_law(1.0)] * len(KAPPAS))[None]
    top = decide(MARKS, same, KAPPAS, B, smoothing=1.0)
    assert top.b_crit is None and top.bound == "B_crit >= 160" and top.b_crit_ci is None
    stuck = np.array([power_law(1.0)] + [[5.0] + [math.nan] * (len(MARKS) - 1)] * 4)[None]
    bottom = decide(MARKS, stuck, KAPPAS, B, smoothing=1.0)
    assert bottom.b_crit is None and bottom.bound == "B_crit <= 10" and bottom.kappa_star == 1


def test_no_progress_of_the_base_batch_is_neither_a_value_nor_a_bound() -> None:
    flat = [5.0] + [5.01] * (len(MARKS) - 1)  # a run at its noise floor: every branch "keeps up"
    curves = np.array([flat] + [power_law(1.0)] * 2)[None]
    result = decide(MARKS, curves, (1, 2, 4), B, smoothing=1.0)
    assert result.b_crit is None and result.bound is None and result.b_crit_ci is None
    assert result.note is not None and "base batch 10 made no progress" in result.note


def test_a_diverged_smaller_branch_does_not_stop_a_larger_one() -> None:
    diverged = [5.0, 9.0] + [math.inf] * (len(MARKS) - 2)
    curves = np.array([power_law(1.0), diverged, power_law(1.5)])[None]
    result = decide(MARKS, curves, (1, 2, 4), B, smoothing=1.0)
    assert result.test.keeps_up == (True, False, True) and result.b_crit is None and result.bound


def test_interval_resamples_the_replicas() -> None:
    # Replica 0 says kappa* = 4 (B_crit 35), replica 1 says 2 (B_crit 12): resamples give 2 or 4,
    # the mean curves 4, so the 95% interval spans both grid values.
    reps = np.array([[power_law(hyperbola_rho(k, bc)) for k in KAPPAS] for bc in (35.0, 12.0)])
    result = decide(MARKS, reps, KAPPAS, B, smoothing=1.0, n_bootstrap=400)
    assert result.replicas == 2 and result.b_crit in (20, 40)
    assert result.b_crit_ci == (20.0, 40.0)
    same = decide(MARKS, np.repeat(reps[:1], 3, axis=0), KAPPAS, B, smoothing=1.0, n_bootstrap=100)
    assert same.b_crit == 40 and same.b_crit_ci == (40.0, 40.0)


@pytest.mark.parametrize(
    ("kappas", "message"),
    [
        ((1,), "at least two"),
        ((2, 4), "start at 1"),
        ((1, 4, 2), "increase"),
        ((1, 2, 2), "increase"),
        ((1, 2.5), "integer"),
        ((1, True), "integer"),
    ],
)
def test_bad_multipliers_are_refused(kappas: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_branch_grid(kappas)


def test_bad_shapes_and_settings_are_refused() -> None:
    curves = np.zeros((1, 3, len(MARKS)))
    with pytest.raises(ValueError, match=r"expected losses \[R, 2, 11\]"):
        decide(MARKS, curves, (1, 2), B)
    for kwargs in ({"tolerance": -1.0}, {"kind": "steps"}, {"smoothing": 0.0}, {"smoothing": 1.5}):
        with pytest.raises(ValueError, match="tolerance >= 0"):
            decide(MARKS, curves, (1, 2, 4), B, **kwargs)
