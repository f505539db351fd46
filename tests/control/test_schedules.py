"""Examples-keyed learning-rate schedules: exact values at the phase boundaries; batch changes survived."""

from __future__ import annotations

import io
import math

import pytest
import torch

from noisescale.control.schedules import WarmupCosine, WarmupStableDecay, key_by_examples


def test_warmup_cosine_at_its_boundaries() -> None:
    s = WarmupCosine(warmup=1000, total=11_000, final=0.1)
    assert [s(x) for x in (0, 500, 1000)] == [0.0, 0.5, 1.0]  # 1. linear warmup
    assert s(6000) == pytest.approx(0.55, rel=1e-15)  # 2. half-way down the cosine: (1 + final) / 2
    assert s(3500) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-15)
    assert s(11_000) == s(10**9) == 0.1  # 3. final
    assert WarmupCosine(warmup=0, total=10)(0) == 1.0  # no warmup


def test_warmup_stable_decay_at_its_boundaries() -> None:
    s = WarmupStableDecay(warmup=100, total=1000, decay=300, final=0.2)
    assert [s(x) for x in (0, 50, 100, 699, 700)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert s(850) == pytest.approx(0.6, rel=1e-15)  # half-way down: 1 - 0.8 x 0.5
    assert s(1000) == s(5000) == 0.2
    assert WarmupStableDecay(warmup=10, total=100, decay=0)(99) == 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: WarmupCosine(warmup=200, total=100),
        lambda: WarmupCosine(warmup=-1, total=100),
        lambda: WarmupCosine(warmup=1, total=math.inf),
        lambda: WarmupCosine(warmup=1, total=100, final=1.5),
        lambda: WarmupStableDecay(warmup=50, total=100, decay=60),
        lambda: WarmupStableDecay(warmup=0, total=0, decay=0),
    ],
)
def test_bad_schedules_are_refused(make: object) -> None:
    with pytest.raises(ValueError, match=r"total|final|finite"):
        make()  # type: ignore[operator]


def _lr_at_examples(batches: list[int]) -> dict[int, float]:
    """Train nothing; step an examples-keyed schedule through these batch sizes; lr after each step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    seen = [0]
    sched = key_by_examples(torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(512, 4096)), lambda: seen[0])
    out = {}
    for b in batches:
        seen[0] += b
        opt.step()
        sched.step()
        out[seen[0]] = opt.param_groups[0]["lr"]
    return out


def test_an_examples_keyed_schedule_is_the_same_curve_whatever_the_batch() -> None:
    constant = _lr_at_examples([32] * 128)
    growing = _lr_at_examples([32] * 8 + [64] * 4 + [256] * 14)
    assert set(growing) <= set(constant)
    for examples, lr in growing.items():
        assert lr == pytest.approx(constant[examples], rel=1e-15)
        assert lr == pytest.approx(0.4 * WarmupCosine(512, 4096)(examples), rel=1e-15)


def test_a_step_keyed_hugging_face_schedule_keeps_its_shape_in_examples() -> None:
    import transformers  # the test extras install it

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=100)
    seen = [0]
    key_by_examples(sched, lambda: seen[0], examples_per_step=64)  # written for 64 examples a step
    reference = transformers.get_cosine_schedule_with_warmup(
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3),
        num_warmup_steps=10,
        num_training_steps=100,
    ).lr_lambdas[0]
    for batch in [64] * 5 + [256] * 10:  # the batch grows 4x after 5 steps
        seen[0] += batch
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * reference(seen[0] / 64), rel=1e-12)
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)  # the wrapped functions are not saved (nothing unpicklable)


def test_only_a_lambda_lr_can_be_rekeyed() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="LambdaLR"):
        key_by_examples(torch.optim.lr_scheduler.StepLR(opt, 10), lambda: 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="examples_per_step"):
        key_by_examples(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), lambda: 0, examples_per_step=0)
