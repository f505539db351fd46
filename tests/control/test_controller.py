"""BatchSizeController on a real meter: growth by integer factors, the lr rule, resume exactness, one rule.

The task is SCIENCE.md's linear-regression oracle (isotropic, 5 inputs, noise 0.7): as SGD shrinks
delta = w - w*, B_simple = 1 + d (1 + sigma^2 / |delta|^2) rises from about 7 to hundreds of examples,
so an adaptive run grows its batch several times in 600 steps (lr 0.005, averaging over ~50 steps).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from noisescale.control.controller import BatchSizeController
from noisescale.control.export import schedule_from_run
from noisescale.control.rules import AdamRule, SGDRule
from noisescale.meter import GradientNoiseScale

D, SIGMA, MICRO = 5, 0.7, 4
STEPS, KILLED = 600, 503
SETTINGS: dict[str, Any] = {
    "batch_size": 8,
    "micro_batch_size": MICRO,
    "max_batch_size": 256,
    "check_every": 5,
}


class Run:
    """Model, optimizer, meter, controller and data stream of one adaptive run."""

    def __init__(self, **settings: Any) -> None:
        torch.manual_seed(0)
        self.w_star = torch.ones(D, dtype=torch.float64)
        self.model = torch.nn.Linear(D, 1, bias=False).double()
        with torch.no_grad():
            self.model.weight.copy_(
                self.w_star + torch.tensor([1.0, -1.0, 0.5, 0.8, -0.6], dtype=torch.float64)
            )
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.005)
        self.meter = GradientNoiseScale(self.model, method="microbatch", ema_decay=0.98)
        options = {**SETTINGS, **settings}
        self.controller = BatchSizeController(self.meter, optimizer=self.opt, rule=SGDRule(), **options)
        self.data = torch.Generator().manual_seed(1)
        self.curve: list[tuple[int, tuple[float, float] | None]] = []

    def step(self) -> None:
        k = self.controller.micro_batches
        for _ in range(k):
            x = torch.randn(MICRO, D, generator=self.data, dtype=torch.float64)
            y = x @ self.w_star + SIGMA * torch.randn(MICRO, generator=self.data, dtype=torch.float64)
            loss = 0.5 * (self.model(x).squeeze(1) - y).square().mean() / k
            loss.backward()
        self.meter.update(batch_size=self.controller.per_rank_batch_size)
        self.opt.step()
        self.opt.zero_grad()
        self.controller.step()
        est = self.controller.last_estimate
        if est is not None and self.controller.steps % self.controller.check_every == 0:
            self.curve.append((self.controller.examples, est.b_simple_ci if est.resolved else None))

    def save(self, path: Path) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "opt": self.opt.state_dict(),
                "meter": self.meter.state_dict(),
                "controller": self.controller.state_dict(),
                "data": self.data.get_state(),
            },
            path,
        )

    def load(self, path: Path) -> None:
        saved = torch.load(path, weights_only=True)  # plain tensors, numbers, strings
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["opt"])
        self.meter.load_state_dict(saved["meter"])
        self.controller.load_state_dict(saved["controller"])
        self.data.set_state(saved["data"])


@pytest.fixture(scope="module")
def uninterrupted() -> Run:
    run = Run()
    for _ in range(STEPS):
        run.step()
    return run


def test_the_batch_grows_by_integer_factors_as_the_noise_scale_rises(uninterrupted: Run) -> None:
    schedule = uninterrupted.controller.schedule
    assert schedule[0].to_dict() == {"step": 0, "examples": 0, "batch_size": 8, "lr": 0.005}
    assert len(schedule) >= 3, schedule
    for before, after in itertools.pairwise(schedule):
        assert after.batch_size % before.batch_size == 0 and after.batch_size > before.batch_size
        assert after.batch_size % MICRO == 0 and after.batch_size <= 256
        assert after.step % 5 == 0  # decided only when the estimate was looked at
    examples = sum(c.batch_size * (n.step - c.step) for c, n in itertools.pairwise(schedule))
    assert uninterrupted.controller.examples == examples + schedule[-1].batch_size * (
        STEPS - schedule[-1].step
    )


def test_each_change_follows_the_lower_bound_and_the_sgd_rule() -> None:
    run, lr = Run(), 0.005
    for _ in range(STEPS):
        before = run.controller.batch_size
        run.step()
        if run.controller.batch_size != before:
            est = run.controller.last_estimate
            assert est is not None and est.resolved and est.b_simple_ci is not None
            assert run.controller.batch_size <= est.b_simple_ci[0] / 1.1
            assert est.b_simple is not None
            lr *= (1 + est.b_simple / before) / (1 + est.b_simple / run.controller.batch_size)
            assert run.opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
            assert run.controller.schedule[-1].lr == pytest.approx(lr, rel=1e-12)
    assert run.opt.param_groups[0]["lr"] > 0.005


def test_an_unresolved_estimate_changes_nothing() -> None:
    run = Run(check_every=1)
    run.step()  # one step: the meter cannot resolve B_simple yet
    assert run.controller.last_estimate is not None and not run.controller.last_estimate.resolved
    assert run.controller.batch_size == 8 and len(run.controller.schedule) == 1


def test_a_resumed_run_makes_the_uninterrupted_runs_decisions(uninterrupted: Run, tmp_path: Path) -> None:
    first = Run()
    for _ in range(KILLED):  # between two looks, after the first change
        first.step()
    assert len(first.controller.schedule) >= 2
    assert any(c.step > KILLED for c in uninterrupted.controller.schedule)  # decisions after the resume
    first.save(tmp_path / "ckpt.pt")
    del first
    resumed = Run()
    resumed.load(tmp_path / "ckpt.pt")
    for _ in range(STEPS - KILLED):
        resumed.step()
    assert resumed.controller.schedule == uninterrupted.controller.schedule
    assert torch.equal(resumed.model.weight, uninterrupted.model.weight)
    assert resumed.opt.param_groups[0]["lr"] == uninterrupted.opt.param_groups[0]["lr"]


def test_the_export_replays_the_controllers_own_decisions() -> None:
    run = Run(check_every=1)
    for _ in range(STEPS):
        run.step()
    examples, cis = zip(*run.curve, strict=True)
    stages = schedule_from_run(run.controller.policy, list(examples), list(cis))
    assert [(c.examples, c.batch_size) for c in run.controller.schedule] == [tuple(s) for s in stages]
    assert len(stages) >= 2


def test_a_state_saved_with_other_settings_is_refused() -> None:
    state = Run().controller.state_dict()
    other = Run(max_batch_size=512, check_every=3)
    with pytest.raises(ValueError, match=r"max_batch_size: saved 256, now 512.*check_every: saved 5, now 3"):
        other.controller.load_state_dict(state)


def test_bad_settings_fail_before_training() -> None:
    model = torch.nn.Linear(2, 1)
    meter = GradientNoiseScale(model, method="microbatch")
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.999))
    with pytest.raises(ValueError, match="both `optimizer` and `rule`"):
        BatchSizeController(meter, batch_size=8, micro_batch_size=4, optimizer=opt)
    with pytest.raises(ValueError, match=r"beta1 = 0\.9"):
        BatchSizeController(
            meter, batch_size=8, micro_batch_size=4, max_batch_size=256, optimizer=opt, rule=AdamRule()
        )
    with pytest.raises(ValueError, match=r"beta1 = 0\.9"):  # no maximum: an unbounded growth
        BatchSizeController(meter, batch_size=8, micro_batch_size=4, optimizer=opt, rule=AdamRule())
    BatchSizeController(
        meter, batch_size=8, micro_batch_size=4, max_batch_size=80, optimizer=opt, rule=AdamRule()
    )
    with pytest.raises(ValueError, match="check_every"):
        BatchSizeController(meter, batch_size=8, micro_batch_size=4, check_every=0)
    with pytest.raises(ValueError, match="use 8 or 12"):
        BatchSizeController(meter, batch_size=10, micro_batch_size=4)
    controller = BatchSizeController(meter, batch_size=8, micro_batch_size=4)
    with pytest.raises(ValueError, match="examples"):
        controller.step(examples=0)
