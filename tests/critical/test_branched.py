"""The branched-training test (Merrill et al. 2025) on synthetic curves whose answer is known exactly."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from noisescale.critical.branched import (
    branch_test,
    check_branch_grid,
    cumulative_b_crit,
    cumulative_chain,
    decide,
    examples_ratio,
    smooth,
)

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


# Cumulative B_crit: segments of E_min (examples) with a constant local B_crit each.
DE_MIN = [300.0, 500.0, 1200.0, 4000.0]
LOCAL = [12.0, 30.0, 55.0, 140.0]


def base_run(batch: float) -> tuple[np.ndarray, list[float]]:
    """Branch points and examples per segment of a run at ``batch``: eq. 2.11 per segment."""
    spent = [d * (1 + batch / b) for d, b in zip(DE_MIN, LOCAL, strict=True)]
    return np.concatenate([[0.0], np.cumsum(spent)[:-1]]), spent


@pytest.mark.parametrize("batch", [4.0, 16.0, 64.0])
def test_cumulative_is_e_min_over_s_min_whatever_the_base_batch(batch: float) -> None:
    starts, spent = base_run(batch)
    b, e, s = cumulative_b_crit(starts, LOCAL, batch, sum(spent))
    e_min, s_min = sum(DE_MIN), sum(d / b for d, b in zip(DE_MIN, LOCAL, strict=True))
    assert (e, s, b) == pytest.approx((e_min, s_min, e_min / s_min), rel=1e-12)
    for other in (1.0, 50.0, 1000.0):  # every batch then follows the hyperbola of this B_crit
        examples = sum(d * (1 + other / b) for d, b in zip(DE_MIN, LOCAL, strict=True))
        assert examples == pytest.approx(e * (1 + other / b), rel=1e-12)
    part, _, _ = cumulative_b_crit(starts, LOCAL, batch, starts[3] + spent[3] / 4)  # a quarter of the last
    e_part = sum(DE_MIN[:3]) + DE_MIN[3] / 4
    assert part == pytest.approx(e_part / (s_min - 0.75 * DE_MIN[3] / LOCAL[3]), rel=1e-12)


def test_cumulative_of_constant_and_unbounded_local_values() -> None:
    b, _, _ = cumulative_b_crit([0, 7, 50, 51], np.full((3, 4), 33.0), 8, 400)  # batched: [3, 4] -> [3]
    assert b.tolist() == pytest.approx([33.0] * 3, rel=1e-14)
    b, e, s = cumulative_b_crit([0, 100], [20.0, math.inf], 20, 300)  # the second segment takes no steps
    assert (float(b), float(e), float(s)) == pytest.approx((100.0, 250.0, 2.5), rel=1e-14)


def test_cumulative_of_a_growing_local_value_lies_between_start_and_end_values() -> None:
    # b(m) = b0 + k m along E_min = m: S_min(M) = ln(1 + k M / b0) / k exactly; a run at B spends
    # e(m) = m + B S_min(m). Start values under-, end values overestimate (B_crit rises with every
    # b_i), and each segment's own E_min/S_min makes the sum exact.
    b0, k, batch = 10.0, 0.05, 16.0
    m = np.array([0.0, 200.0, 600.0, 1500.0, 4000.0])
    s_of = np.log1p(k * m / b0) / k
    starts, until = m[:-1] + batch * s_of[:-1], m[-1] + batch * s_of[-1]
    exact = m[-1] / s_of[-1]
    low = cumulative_b_crit(starts, b0 + k * m[:-1], batch, until)[0]
    high = cumulative_b_crit(starts, b0 + k * m[1:], batch, until)[0]
    own = cumulative_b_crit(starts, np.diff(m) / np.diff(s_of), batch, until)[0]
    assert low < exact < high and own == pytest.approx(exact, rel=1e-12)


def test_cumulative_refuses_points_that_do_not_start_at_initialisation() -> None:
    with pytest.raises(ValueError, match="branch at initialisation"):
        cumulative_b_crit([64, 128], [10.0, 20.0], 8, 200)
    with pytest.raises(ValueError, match=r"local values >= 0 \(inf allowed\), got \[-1.0\]"):
        cumulative_b_crit([0, 128], [10.0, -1.0], 8, 200)
    with pytest.raises(ValueError, match="local values >= 0"):
        cumulative_b_crit([0, 128], [10.0, math.nan], 8, 200)
    for starts, until, batch in (([0, math.nan], 200, 8), ([0, 128], math.inf, 8), ([0, 128], 200, math.inf)):
        with pytest.raises(ValueError, match="finite"):
            cumulative_b_crit(starts, [10.0, 20.0], batch, until)


def test_chain_refuses_mismatched_points_and_reports_a_missing_start() -> None:
    value = hyperbola_point(35.0)
    with pytest.raises(ValueError, match="one result per branch point"):
        cumulative_chain([0.0, 300.0], [value], B, 1000.0)
    with pytest.raises(ValueError, match="finite until"):
        cumulative_chain([0.0], [value], B, math.nan)
    late = cumulative_chain([50.0, 100.0], [value, value], B, 30.0)  # before the first point, which is not 0
    assert late.b_crit is None and "no branch point at 0" in str(late.note)


def hyperbola_point(*b_crits: float, n_bootstrap: int = 400) -> Any:
    """decide() on replicas whose curves follow the hyperbola of these B_crit (one per replica)."""
    reps = np.array([[power_law(hyperbola_rho(k, bc)) for k in KAPPAS] for bc in b_crits])
    return decide(MARKS, reps, KAPPAS, B, smoothing=1.0, n_bootstrap=n_bootstrap)


def test_chain_interval_resamples_every_points_replicas() -> None:
    # Point 0: replicas say 40 and 20 (resamples give both); point 1: 40 in every resample.
    points = [hyperbola_point(35.0, 12.0), hyperbola_point(35.0, 35.0)]
    starts, until = [0.0, 300.0], 1000.0
    chain = cumulative_chain(starts, points, B, until)
    values = [p.b_crit for p in points]
    assert chain.b_crit == pytest.approx(float(cumulative_b_crit(starts, values, B, until)[0]), rel=1e-14)
    low = float(cumulative_b_crit(starts, [20.0, 40.0], B, until)[0])
    assert chain.b_crit_ci == pytest.approx((low, 40.0), rel=1e-14) and chain.bound is None


def test_chain_bounds_and_undefined_values() -> None:
    value, top = hyperbola_point(35.0), decide(MARKS, np.array([power_law(1.0)] * 5)[None], KAPPAS, B)
    assert top.bound == "B_crit >= 160"
    chain = cumulative_chain([0.0, 300.0], [value, top], B, 1000.0)
    at_bound = float(cumulative_b_crit([0.0, 300.0], [40.0, 160.0], B, 1000.0)[0])
    assert chain.b_crit is None and chain.b_crit_ci is None and chain.bound is not None
    assert chain.bound.startswith("B_crit >= ")
    assert at_bound * 0.99 < float(chain.bound.split()[-1]) <= at_bound  # rounded down: the bound stays true
    # Bracketed by the bound's far end: the segment after 300 at infinite local B_crit adds its 700
    # examples to E_min and no steps to S_min; the first segment (local 40) adds 300/(1 + B/40) and
    # 300/(40 + B).
    e_first, s_first = 300 / (1 + B / 40), 300 / (40 + B)
    assert chain.bracket == pytest.approx((at_bound, (e_first + 700) / s_first), rel=1e-14)
    assert cumulative_chain([0.0, 300.0], [value, top], B, 300.0).b_crit == 40.0  # the bound is later
    stuck = np.array([power_law(1.0)] + [[5.0] + [math.nan] * (len(MARKS) - 1)] * 4)[None]
    bottom = decide(MARKS, stuck, KAPPAS, B, smoothing=1.0)
    assert "both directions" in str(cumulative_chain([0.0, 300.0], [top, bottom], B, 900.0).note)
    # An upper bound (B_crit <= B after 300): the far end is a local value of 0, a segment adding no
    # E_min and 700/B steps; at the bound, 700/(1 + B/B) and 700/(2 B).
    below = cumulative_chain([0.0, 300.0], [value, bottom], B, 1000.0)
    at_b = (e_first + 350) / (s_first + 700 / (2 * B))
    assert below.bound is not None and below.bound.startswith("B_crit <= ") and below.b_crit is None
    assert at_b <= float(below.bound.split()[-1]) < at_b * 1.01  # rounded up: the bound stays true
    assert below.bracket == pytest.approx((e_first / (s_first + 700 / B), at_b), rel=1e-14)
    flat = decide(MARKS, np.array([[5.0] + [5.01] * 10] * 5)[None], KAPPAS, B, smoothing=1.0)
    assert "no local value at 300" in str(cumulative_chain([0.0, 300.0], [value, flat], B, 400.0).note)
    assert "no branch point at 0" in str(cumulative_chain([64.0], [value], B, 400.0).note)
    assert "initialisation" in str(cumulative_chain([0.0], [value], B, 0.0).note)
