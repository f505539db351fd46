"""The optimizer rules against their formulas (McCandlish et al. 2018 eq. 2.6; Malladi et al. 2022)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from noisescale.control.rules import AdamRule, SGDRule, apply_rule

# SCIENCE.md's linear-regression test vector: eps_max and B_noise (eq. 2.6 holds exactly on it).
EPS_MAX, B_NOISE = 0.4519434, 7.140705


def _eps_opt(batch: float) -> float:
    return EPS_MAX / (1.0 + B_NOISE / batch)


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]


def test_sgd_rule_is_the_ratio_of_eq_2_6() -> None:
    assert _eps_opt(16) == pytest.approx(0.3124837, rel=1e-6)  # SCIENCE.md's value at B = 16
    for old, new in ((16, 32), (16, 256), (64, 16), (3, 9)):
        factor = SGDRule().lr_factor(old, new, b_simple=B_NOISE)
        assert factor == pytest.approx(_eps_opt(new) / _eps_opt(old), rel=1e-12)


def test_sgd_rule_never_exceeds_linear_scaling() -> None:
    for old, k, b in itertools.product((1, 8, 100), (2, 3, 16, 1000), (1e-6, 1.0, 50.0, 1e4, 1e12)):
        up = SGDRule().lr_factor(old, old * k, b)
        down = SGDRule().lr_factor(old * k, old, b)
        assert 1.0 <= up <= k * (1 + 1e-12)
        assert 1.0 / k * (1 - 1e-12) <= down <= 1.0
        assert up * down == pytest.approx(1.0, rel=1e-12)  # up then down restores the rate


def test_sgd_rule_rescales_the_rate_and_schedulers_only() -> None:
    opt = torch.optim.SGD(_params(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    factor = apply_rule(SGDRule(), opt.param_groups, old=64, new=256, b_simple=128.0, schedulers=[sched])
    assert factor == pytest.approx((1 + 128 / 64) / (1 + 128 / 256))
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.05 * factor)  # the scheduler had set 0.1 x 0.5
    assert group["initial_lr"] == pytest.approx(0.1 * factor)
    assert sched.base_lrs == [pytest.approx(0.1 * factor)]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)
    opt.step()
    sched.step()  # the schedule keeps multiplying the rescaled base
    assert group["lr"] == pytest.approx(0.05 * factor)


@pytest.mark.parametrize("kappa", [2, 4, 0.5])
def test_adamw_follows_the_square_root_rule_and_keeps_the_timescale(kappa: float) -> None:
    opt = torch.optim.AdamW(_params(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    old = 64
    new = int(old * kappa)
    tau = old / (3e-4 * 0.1)  # B / (eta lambda), per dataset size D
    apply_rule(AdamRule(), opt.param_groups, old=old, new=new, b_simple=1e3)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(3e-4 * math.sqrt(kappa), rel=1e-12)
    assert group["betas"][0] == pytest.approx(1 - kappa * 0.1, rel=1e-12)
    assert group["betas"][1] == pytest.approx(1 - kappa * 0.05, rel=1e-12)
    assert group["eps"] == pytest.approx(1e-8 / math.sqrt(kappa), rel=1e-12)
    assert new / (group["lr"] * group["weight_decay"]) == pytest.approx(tau, rel=1e-12)


def test_adam_rule_parts_switch_off_and_coupled_weight_decay_is_kept() -> None:
    opt = torch.optim.Adam(_params(), lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)  # L2, coupled
    apply_rule(AdamRule(betas=False, eps=False), opt.param_groups, old=10, new=40, b_simple=5.0)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        2e-3,
        (0.9, 0.99),
        1e-6,
        0.01,
    )
    opt = torch.optim.AdamW(_params(), lr=1e-3, weight_decay=0.01)
    apply_rule(AdamRule(lr=False), opt.param_groups, old=10, new=40, b_simple=5.0)
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3
    assert group["weight_decay"] == pytest.approx(0.04)  # lr unchanged: lambda x kappa keeps B / (eta lambda)


def test_repeated_changes_compose_to_one() -> None:
    one = torch.optim.AdamW(_params(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)
    two = torch.optim.AdamW(_params(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)
    apply_rule(AdamRule(), one.param_groups, old=8, new=64, b_simple=1.0)
    apply_rule(AdamRule(), two.param_groups, old=8, new=16, b_simple=1.0)
    apply_rule(AdamRule(), two.param_groups, old=16, new=64, b_simple=1.0)
    for key in ("lr", "eps", "weight_decay"):
        assert two.param_groups[0][key] == pytest.approx(one.param_groups[0][key], rel=1e-12)
    assert two.param_groups[0]["betas"] == pytest.approx(one.param_groups[0]["betas"], rel=1e-12)


def test_adam_rule_refuses_a_growth_that_makes_a_beta_negative() -> None:
    opt = torch.optim.AdamW(_params(), betas=(0.9, 0.999))
    AdamRule().check(opt, 10.0)  # beta1' = 1 - 10 x 0.1 = 0: allowed
    with pytest.raises(ValueError, match=r"beta1 = 0.9 .* AdamRule\(betas=False\)"):
        AdamRule().check(opt, 16.0)
    with pytest.raises(ValueError, match="beta1"):
        AdamRule().check(opt, math.inf)
    AdamRule(betas=False).check(opt, math.inf)
    with pytest.raises(ValueError, match=r"would map beta = 0\.9"):
        apply_rule(AdamRule(), opt.param_groups, old=1, new=16, b_simple=1.0)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (
        0.9,
        0.999,
    )  # nothing changed


def test_max_lr_caps_the_base_rate_per_group_and_its_scheduler() -> None:
    params = _params()
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.5}, {"params": params[1:], "lr": 0.05}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    factor = apply_rule(
        SGDRule(max_lr=0.8), opt.param_groups, old=32, new=128, b_simple=1e12, schedulers=[sched]
    )
    assert factor == pytest.approx(0.8 / 0.5)  # linear would give 4: capped at max_lr
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.8, 0.2])  # the other: linear
    assert sched.base_lrs == pytest.approx([0.8, 0.2])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.1])
    apply_rule(SGDRule(max_lr=0.1), opt.param_groups, old=128, new=32, b_simple=1e12, schedulers=[sched])
    assert sched.base_lrs == pytest.approx([0.2, 0.05])  # a decrease is never held back by the cap


@pytest.mark.parametrize("rule", [SGDRule, AdamRule])
@pytest.mark.parametrize("max_lr", [0.0, -1.0, math.nan, math.inf, "0.1"])
def test_a_max_lr_that_is_not_a_positive_rate_is_refused(rule: type, max_lr: object) -> None:
    """A cap of 0, < 0 or NaN was ignored silently (``max(cap / base, 1)`` is then 1 or NaN)."""
    with pytest.raises(ValueError, match="`max_lr` to be a positive finite learning rate"):
        rule(max_lr=max_lr)
