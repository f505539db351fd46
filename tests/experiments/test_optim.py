"""The optimizer of a built-in run: SGD or AdamW, the warmup at its boundary steps, the checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisescale.experiments.optim import make_optimizer, warmup_factor
from noisescale.experiments.tasks import get_task
from noisescale.experiments.training import TrainConfig, Trainer


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (4, 1.0), (1000, 1.0)]
)
def test_warmup_is_linear_then_flat(step: int, expected: float) -> None:
    assert warmup_factor(step, 4) == expected


def test_learning_rate_per_step_follows_the_warmup() -> None:
    opt, sched = make_optimizer(nn.Linear(3, 2).parameters(), "adamw", lr=0.1, warmup_steps=3)
    rates = []
    for _ in range(5):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1], rel=1e-12)


def test_adamw_decays_matrices_only() -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt, _ = make_optimizer(model.parameters(), "adamw", lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.9)
    # One step with a zero gradient: AdamW's update is the decay alone, lr * wd * w, on the matrices.
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        factor = 1 - 1e-3 * 0.1 if p.dim() >= 2 else 1.0
        torch.testing.assert_close(p.detach(), b * factor, rtol=0, atol=1e-7)


def test_sgd_is_the_default_and_keeps_momentum() -> None:
    opt, _ = make_optimizer(nn.Linear(2, 1).parameters(), "sgd", lr=0.5, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"optimizer": "adam"}, "unknown optimizer 'adam'"),
        ({"optimizer": "adamw", "momentum": 0.9}, "momentum is an SGD setting"),
        ({"weight_decay": -1.0}, "weight_decay >= 0"),
        ({"warmup_steps": -1}, "warmup_steps >= 0"),
        ({"optimizer": "adamw", "betas": (0.9, 1.0)}, r"two betas in \[0, 1\)"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(batch_size=8, microbatches=1, lr=0.1, steps=1, **settings)


def test_trainer_steps_with_the_configured_optimizer() -> None:
    task = get_task("linreg")
    config = TrainConfig.for_task(task, method=None, lr=0.1, optimizer="adamw", warmup_steps=2, steps=3)
    with Trainer(task, config) as trainer:
        rates = [trainer.step().lr for _ in range(3)]
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert rates == pytest.approx([0.05, 0.1, 0.1])
