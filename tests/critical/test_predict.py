"""Tests of predictions from B_crit (McCandlish et al. 2018 eq. 2.11; Kaplan et al. 2020 eqs. 5.3-5.5)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from noisescale.critical.predict import (
    PF_DAY,
    BCritPowerLaw,
    b_crit_at_loss,
    compute_min,
    examples_at,
    fit_b_crit_power_law,
    learning_rate_at,
    optimal_batch_for_exchange_rate,
    predict_batches,
    speedup,
    steps_at,
    steps_min,
    tradeoff_sentence,
)
from noisescale.errors import SweepDataError
from noisescale.experiments.tasks import LINREG_DELTA, linreg_truth

B = np.geomspace(1, 1e6, 25)


def test_steps_and_examples_lie_on_the_hyperbola() -> None:
    s_min, b_crit = 1200.0, 835.0
    s, e = steps_at(B, s_min, b_crit), examples_at(B, s_min * b_crit, b_crit)
    np.testing.assert_allclose((s / s_min - 1) * (e / (s_min * b_crit) - 1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(e, B * s, rtol=1e-12)
    assert steps_at(b_crit, s_min, b_crit) == pytest.approx(2 * s_min)  # 2 S_min at B_crit
    assert isinstance(steps_at(512, s_min, b_crit), float)


def test_speedup_is_a_ratio_of_steps() -> None:
    np.testing.assert_allclose(speedup(B, 64.0, 300.0), steps_at(64.0, 1.0, 300.0) / steps_at(B, 1.0, 300.0))
    # From B = B_crit (2 S_min steps) even an unbounded batch at most halves the steps.
    assert speedup(1e12, 300.0, 300.0) == pytest.approx(2.0)


def test_tradeoff_sentence_matches_the_issue_wording() -> None:
    # B_crit = 835: steps x (1 + 835/1024)/(1 + 835/512) = 0.691, examples x 1.382.
    assert tradeoff_sentence(512, 1024, 835) == (
        "doubling the batch from 512 to 1024 cuts steps by 31% and costs 38% more examples"
    )
    assert tradeoff_sentence(1024, 512, 835, unit="tokens") == (
        "halving the batch from 1024 to 512 adds 45% more steps and saves 28% of tokens"
    )
    assert tradeoff_sentence(256, 1024, 835).startswith("quadrupling the batch from 256 to 1024")
    assert tradeoff_sentence(512, 768, 835).startswith("raising the batch from 512 to 768")


@pytest.mark.parametrize("b_crit", [10.0, 835.0, 1e5])
def test_tradeoff_percentages_follow_from_the_hyperbola(b_crit: float) -> None:
    text = tradeoff_sentence(300, 900, b_crit)
    ratio = steps_at(900, 1.0, b_crit) / steps_at(300, 1.0, b_crit)
    assert f"cuts steps by {round(100 * (1 - ratio))}%" in text
    assert f"costs {round(100 * (3 * ratio - 1))}% more examples" in text


def test_tradeoff_sentence_rejects_equal_sizes() -> None:
    with pytest.raises(ValueError, match="different"):
        tradeoff_sentence(512, 512, 835)


@pytest.mark.parametrize(
    ("rate", "s_min", "b_crit"), [(1.0, 10.0, 100.0), (5e3, 1e4, 835.0), (1e6, 3.0, 2e5)]
)
def test_exchange_rate_optimum_minimises_examples_plus_rate_times_steps(
    rate: float, s_min: float, b_crit: float
) -> None:
    def cost(log_b: float) -> float:
        b = np.exp(log_b)
        return examples_at(b, s_min * b_crit, b_crit) + rate * steps_at(b, s_min, b_crit)

    res = optimize.minimize_scalar(cost, bounds=(np.log(1e-3), np.log(1e9)), method="bounded",
                                   options={"xatol": 1e-10})  # fmt: skip
    best = optimal_batch_for_exchange_rate(rate, b_crit)
    assert best == pytest.approx(np.sqrt(rate * b_crit), rel=1e-12)
    # The cost is flat at its minimum, so the numeric argmin is good to ~sqrt(xatol) in log B.
    assert np.exp(res.x) == pytest.approx(best, rel=1e-4)


def test_power_law_recovers_kaplan_constants() -> None:
    losses = np.array([4.0, 3.5, 3.0, 2.7, 2.4])
    law = fit_b_crit_power_law(losses, b_crit_at_loss(losses, 2e8, 0.21))
    assert law.b_star == pytest.approx(2e8, rel=1e-9)
    assert law.alpha_b == pytest.approx(0.21, rel=1e-9)
    b_star, alpha_b = law  # unpacks as (b_star, alpha_b)
    assert (b_star, alpha_b) == (law.b_star, law.alpha_b)


def test_power_law_with_noise_and_doubling_rule() -> None:
    losses = np.linspace(4.0, 2.0, 8)
    noise = np.exp(np.random.default_rng(0).normal(0.0, 0.05, losses.size))
    law = fit_b_crit_power_law(losses, b_crit_at_loss(losses, 2e8, 0.21) * noise)
    # 5% scatter over a factor-2 loss range: the slope -1/alpha (4.76) is good to ~0.2, i.e.
    # alpha to ~5%; 20% is a loose 4-sigma bound.
    assert law.alpha_b == pytest.approx(0.21, rel=0.2)
    # Kaplan et al.: B_crit roughly doubles for every 13% drop in loss (1 - 2^-0.21 = 0.1355).
    exact = BCritPowerLaw(2e8, 0.21)
    assert exact.doubling_drop() == pytest.approx(0.1355, abs=1e-4)
    loss = 3.0
    assert b_crit_at_loss(loss * (1 - exact.doubling_drop()), *exact) == pytest.approx(
        2 * b_crit_at_loss(loss, *exact)
    )


@pytest.mark.parametrize(
    ("losses", "b_crits", "match"),
    [
        pytest.param([3.0, 2.0], [1e3, 2e3], "3 or more", id="two_goals"),
        pytest.param([3.0, 2.5, 2.0], [3e3, 2e3, 1e3], "does not grow", id="shrinking"),
        pytest.param([3.0, 0.0, 2.0], [1e3, 2e3, 3e3], "positive", id="zero_loss"),
        pytest.param([3.0, 2.5, 2.0], [1e3, 2e3], "got 3 losses", id="lengths"),
    ],
)
def test_power_law_errors(losses: list, b_crits: list, match: str) -> None:
    with pytest.raises(SweepDataError, match=match):
        fit_b_crit_power_law(losses, b_crits)


def test_kaplan_minimum_steps_and_compute_invert_the_hyperbola() -> None:
    s_min, b_crit = 1200.0, 835.0
    np.testing.assert_allclose(steps_min(steps_at(B, s_min, b_crit), B, b_crit), s_min, rtol=1e-12)  # eq. 5.4
    # eq. 5.5 with compute proportional to examples (C = 6 N E): C_min = 6 N E_min.
    c = 6 * 1e6 * examples_at(B, s_min * b_crit, b_crit)
    np.testing.assert_allclose(compute_min(c, B, b_crit), 6 * 1e6 * s_min * b_crit, rtol=1e-12)


def test_predict_batches_table() -> None:
    df = predict_batches([1024, 512, 2048], b_crit=835.0, s_min=1200.0)
    assert list(df.columns) == ["batch_size", "steps", "examples", "speedup", "efficiency"]
    assert df["batch_size"].tolist() == [512.0, 1024.0, 2048.0]
    assert df["speedup"].iloc[0] == 1.0
    np.testing.assert_allclose(df["efficiency"], 1 / (1 + df["batch_size"] / 835.0))
    np.testing.assert_allclose(df["examples"], df["batch_size"] * df["steps"])
    assert predict_batches([512], b_crit=835.0)["steps"].isna().all()


def test_learning_rate_is_eq_2_6_on_the_oracle() -> None:
    """SCIENCE.md: at B = 16 the oracle's eps_opt is 0.3124837; linear below B_noise, flat above."""
    truth = linreg_truth(LINREG_DELTA)
    eps_max, b_noise = truth["eps_max"], truth["b_noise"]
    assert learning_rate_at(16.0, eps_max, b_noise) == pytest.approx(0.3124837, abs=1e-7)
    assert learning_rate_at(b_noise, eps_max, b_noise) == pytest.approx(eps_max / 2, rel=1e-12)
    small, huge = learning_rate_at(np.array([1e-6, 1e12]), eps_max, b_noise)
    assert small == pytest.approx(eps_max * 1e-6 / b_noise, rel=1e-6)
    assert huge == pytest.approx(eps_max, rel=1e-10)
    # The quadratic model's loss drop at that step is the closed form's 0.5859070 (eq. 2.5, 2.7).
    eps = learning_rate_at(16.0, eps_max, b_noise)
    drop = eps * truth["grad_norm_sq"] - 0.5 * eps**2 * (truth["g_h_g"] + truth["trace_h_sigma"] / 16)
    assert drop == pytest.approx(0.5859070, abs=1e-7)


def test_predict_batches_compute_and_time_follow_the_hand_formulas() -> None:
    s_min, b_crit, flops, tput, devices = 1200.0, 835.0, 6 * 1.2e8, 3000.0, 8
    df = predict_batches(
        [256, 1024], b_crit=b_crit, s_min=s_min, learning_rate=(0.45, 7.14),
        flops_per_example=flops, throughput=tput, devices=devices,
    )  # fmt: skip
    for b, row in zip([256, 1024], df.itertuples(), strict=True):
        examples = s_min * b_crit * (1 + b / b_crit)  # E = E_min (1 + B/B_crit)
        assert row.flops == pytest.approx(flops * examples, rel=1e-12)
        assert row.pf_days == pytest.approx(flops * examples / (1e15 * 86400), rel=1e-12)
        assert row.compute_ratio == pytest.approx(1 + b / b_crit, rel=1e-12)  # Kaplan eq. 5.5
        assert compute_min(row.flops, b, b_crit) == pytest.approx(flops * s_min * b_crit, rel=1e-12)
        assert row.time_s == pytest.approx(examples / (tput * devices), rel=1e-12)
        assert row.lr == pytest.approx(0.45 / (1 + 7.14 / b), rel=1e-12)
    assert PF_DAY == 8.64e19
    no_steps = predict_batches([256], b_crit=b_crit, flops_per_example=flops, throughput=tput)
    assert no_steps[["flops", "pf_days", "time_s"]].isna().all(axis=None)
    assert no_steps["compute_ratio"].iloc[0] == pytest.approx(1 + 256 / b_crit)
    with pytest.raises(ValueError, match="`devices` to be an integer >= 1 but got 0"):
        predict_batches([256], b_crit=b_crit, throughput=tput, devices=0)
    with pytest.raises(ValueError, match="`throughput` to be positive"):
        predict_batches([256], b_crit=b_crit, throughput=-1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_non_positive_inputs_raise(bad: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        steps_at(bad, 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        optimal_batch_for_exchange_rate(bad, 100.0)
    with pytest.raises(ValueError, match="`eps_max` to be positive"):
        learning_rate_at(16.0, bad, 7.0)
