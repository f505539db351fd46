"""GradientNoiseScale in real training loops: oracle, loss conventions, AMP, bad input, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from noisescale import GradientNoiseScale, SingleMicrobatchError
from noisescale.collect import EAGER_NUMEL
from tests import oracle


def linreg_model() -> nn.Module:
    model = nn.Linear(5, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(oracle.DELTA)  # w* = 0, so w - w* = delta: the SCIENCE.md test point
    return model


def run_steps(
    meter: GradientNoiseScale,
    model: nn.Module,
    gen: torch.Generator,
    *,
    steps: int,
    sizes: list[int],
    reduction: str = "mean",
    accumulation: str = "mean",
    scaler: torch.amp.GradScaler | None = None,
    scales: list[float] | None = None,
    unscale_first: bool = False,
) -> None:
    """A gradient-accumulation loop at fixed parameters (lr = 0) on fresh oracle data."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    k = len(sizes)
    for step in range(steps):
        xs, ys = oracle.sample_xy((sum(sizes),), gen)  # one draw per step, then split
        for x, y in zip(xs.split(sizes), ys.split(sizes), strict=True):
            per_example = 0.5 * (model(x).squeeze(-1) - y).square()
            loss = per_example.mean() if reduction == "mean" else per_example.sum()
            if accumulation == "mean":
                loss = loss / k
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            if unscale_first:
                scaler.unscale_(opt)
            meter.update(sum(sizes), microbatch_sizes=sizes)
            scaler.step(opt)
            scaler.update(new_scale=scales[step % len(scales)] if scales else None)
        else:
            meter.update(sum(sizes), microbatch_sizes=sizes)
            opt.step()
        opt.zero_grad(set_to_none=True)


def test_microbatch_estimate_matches_oracle_truth() -> None:
    """Within 4 standard errors of B_simple = 7.408 (a false failure has probability 6e-5)."""
    model = linreg_model()
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=1.0)
    run_steps(meter, model, torch.Generator().manual_seed(0), steps=200, sizes=[8] * 4)
    est = meter.compute()
    assert est.resolved
    assert abs(est.b_simple - oracle.B_SIMPLE) < 4 * est.b_simple_se
    assert est.b_simple_ci[0] < est.b_simple < est.b_simple_ci[1]
    assert est.steps == 200 and est.examples == 6400 and est.skipped_steps == 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("accumulation", ["mean", "sum"])
@pytest.mark.parametrize("sizes", [[8, 8, 8, 8], [4, 10, 18]], ids=["equal", "unequal"])
def test_loss_conventions_give_the_same_estimates(
    reduction: str, accumulation: str, sizes: list[int]
) -> None:
    """Sum/mean reduction and dividing by k or not change .grad, never the estimates.

    With unequal micro-batches a sum-reduced loss weights them by size and a mean-reduced
    one equally: two different (both unbiased) big batches, so compare like with like.
    """
    results = []
    ref_reduction = reduction if len(set(sizes)) > 1 else "mean"
    for red, acc in [(ref_reduction, "mean"), (reduction, accumulation)]:
        model = linreg_model()
        meter = GradientNoiseScale(model, method="microbatch", reduction=red, accumulation=acc, ema_decay=1.0)
        run_steps(
            meter,
            model,
            torch.Generator().manual_seed(1),
            steps=50,
            sizes=sizes,
            reduction=red,
            accumulation=acc,
        )
        results.append(meter.compute())
    ref, got = results
    # Same data, same maths up to float64 rounding of different scalings.
    assert got.grad_norm_sq == pytest.approx(ref.grad_norm_sq, rel=1e-9)
    assert got.trace_sigma == pytest.approx(ref.trace_sigma, rel=1e-9)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled-grads", "after-unscale"])
def test_grad_scaler_with_changing_scale(unscale_first: bool) -> None:
    """A GradScaler whose scale changes every step gives the numbers of the unscaled loop."""
    ref_model = linreg_model()
    ref = GradientNoiseScale(ref_model, method="microbatch", ema_decay=0.9)
    run_steps(ref, ref_model, torch.Generator().manual_seed(3), steps=20, sizes=[8, 8, 8])
    model = linreg_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=0.9, scaler=scaler)
    run_steps(
        meter,
        model,
        torch.Generator().manual_seed(3),
        steps=20,
        sizes=[8, 8, 8],
        scaler=scaler,
        scales=[2.0**3, 2.0**17, 1.0, 2.0**9],
        unscale_first=unscale_first,
    )
    a, b = ref.compute(), meter.compute()
    assert b.grad_norm_sq == pytest.approx(a.grad_norm_sq, rel=1e-9)
    assert b.trace_sigma == pytest.approx(a.trace_sigma, rel=1e-9)
    assert b.b_simple_ci == pytest.approx(a.b_simple_ci, rel=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_are_skipped_and_counted(bad: float) -> None:
    model = linreg_model()
    meter = GradientNoiseScale(model, method="microbatch")
    gen = torch.Generator().manual_seed(4)
    run_steps(meter, model, gen, steps=10, sizes=[8, 8])
    before = meter.compute()
    x, y = oracle.sample_xy((8,), gen)
    (0.5 * (model(x).squeeze(-1) - y).square().mean()).backward()
    (bad * model(x).sum()).backward()
    meter.update(16)
    model.zero_grad()
    after = meter.compute()
    assert after.skipped_steps == 1
    assert after.steps == 11
    assert after.b_simple == before.b_simple
    assert after.grad_norm_sq == before.grad_norm_sq


def test_one_microbatch_raises_with_advice() -> None:
    model = linreg_model()
    meter = GradientNoiseScale(model, method="microbatch")
    with pytest.raises(SingleMicrobatchError, match="per_example"):
        run_steps(meter, model, torch.Generator().manual_seed(5), steps=1, sizes=[32])


def test_zero_gradients_are_not_resolved() -> None:
    model = linreg_model()
    meter = GradientNoiseScale(model, method="microbatch")
    for _ in range(5):
        for _ in range(2):
            (model(torch.zeros(4, 5, dtype=torch.float64)).sum() / 2).backward()
        meter.update(8)
        model.zero_grad()
    est = meter.compute()
    assert not est.resolved
    assert est.b_simple is None
    assert est.b_simple_ci is None
    assert est.to_dict()["b_simple"] is None


def test_update_without_backward_raises() -> None:
    meter = GradientNoiseScale(linreg_model(), method="microbatch")
    with pytest.raises(RuntimeError, match="no backward pass"):
        meter.update(8)


def test_bad_arguments() -> None:
    model = linreg_model()
    with pytest.raises(ValueError, match="`method`"):
        GradientNoiseScale(model, method="two_batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`reduction`"):
        GradientNoiseScale(model, method="microbatch", reduction="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        GradientNoiseScale(model, method="microbatch", ema_decay=0.9, ema_examples=100.0)
    model.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        GradientNoiseScale(model, method="microbatch")


def test_frozen_parameters_are_ignored() -> None:
    """A frozen layer in front changes nothing: the estimate only sees trainable parameters."""
    frozen = nn.Linear(5, 5, dtype=torch.float64)
    with torch.no_grad():
        frozen.weight.copy_(torch.eye(5, dtype=torch.float64))
        frozen.bias.zero_()
    frozen.requires_grad_(False)
    model = nn.Sequential(frozen, linreg_model())
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=1.0)
    assert meter.group_names == ["1"]
    ref_model = linreg_model()
    ref = GradientNoiseScale(ref_model, method="microbatch", ema_decay=1.0)
    run_steps(meter, model, torch.Generator().manual_seed(6), steps=10, sizes=[4, 4])
    run_steps(ref, ref_model, torch.Generator().manual_seed(6), steps=10, sizes=[4, 4])
    assert meter.compute().trace_sigma == pytest.approx(ref.compute().trace_sigma, rel=1e-12)


def test_groups_combine_as_mediant() -> None:
    torch.manual_seed(0)  # the initialisation, not the global RNG state other tests leave behind
    model = nn.Sequential(
        nn.Linear(5, 3, dtype=torch.float64), nn.Tanh(), nn.Linear(3, 1, dtype=torch.float64)
    )
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=1.0)
    gen = torch.Generator().manual_seed(7)
    for _ in range(30):
        for _ in range(4):
            x, y = oracle.sample_xy((8,), gen)
            (0.5 * (model(x).squeeze(-1) - y).square().mean() / 4).backward()
        meter.update(32)
        model.zero_grad()
    est = meter.compute()
    assert set(est.groups) == {"0", "2"}
    g = sum(v.grad_norm_sq for v in est.groups.values())
    s = sum(v.trace_sigma for v in est.groups.values())
    assert est.grad_norm_sq == pytest.approx(g)
    assert est.trace_sigma == pytest.approx(s)
    assert est.b_simple == pytest.approx(s / g)


def test_state_dict_round_trip_resumes_identically() -> None:
    model = linreg_model()
    full = GradientNoiseScale(model, method="microbatch", ema_decay=0.95)
    gen = torch.Generator().manual_seed(8)
    run_steps(full, model, gen, steps=10, sizes=[8, 8])
    saved, gen_state = copy.deepcopy(full.state_dict()), gen.get_state()
    run_steps(full, model, gen, steps=10, sizes=[8, 8])

    full.remove()
    resumed = GradientNoiseScale(model, method="microbatch", ema_decay=0.95)
    resumed.load_state_dict(saved)
    gen.set_state(gen_state)
    run_steps(resumed, model, gen, steps=10, sizes=[8, 8])
    assert resumed.compute() == full.compute()


def test_large_gradients_are_moved_into_grad_not_copied() -> None:
    """The hooks let go of a large gradient: autograd moves the first backward's into ``.grad``."""
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 2))  # 65,536-element weight
    meter = GradientNoiseScale(model, method="microbatch")
    weight = model[0].weight
    assert weight.numel() >= EAGER_NUMEL
    seen: list[int] = []
    weight.register_hook(lambda g: seen.append(g.data_ptr()))  # registered after the meter's: runs after it
    xs = torch.randn(2, 3, 256)
    model(xs[0]).square().mean().backward()  # .grad is None: the gradient can be moved in
    assert weight.grad is not None and weight.grad.data_ptr() == seen[0]
    model(xs[1]).square().mean().backward()
    meter.update(batch_size=6)


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_a_backward_that_raised_leaves_nothing_behind(method: str) -> None:
    """Norms of a backward that failed halfway, then zero_grad(), do not leak into the next record.

    Equal up to float64 rounding: after the failed forward, per_example sees each layer called
    twice and sums per-example gradients before norming them (the same numbers, another order).
    """
    data = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    estimates = []
    for fail_first in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        meter = GradientNoiseScale(model, method=method)  # type: ignore[arg-type]
        if fail_first:  # the last layer gets its gradients, then the backward raises
            hidden = model[1](model[0](data[2]))
            hidden.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("boom")))
            with pytest.raises(RuntimeError, match="boom"):
                model[2](hidden).square().mean().backward()
            model.zero_grad(set_to_none=True)
        for x in data[:2]:
            (model(x).square().mean() / 2).backward()
        meter.update(batch_size=8)
        estimates.append(meter.compute())
    clean, after_failure = estimates
    assert after_failure.steps == clean.steps == 1
    assert after_failure.resolved == clean.resolved
    for field in ("grad_norm_sq", "trace_sigma"):
        assert getattr(after_failure, field) == pytest.approx(getattr(clean, field), rel=1e-12)


def test_a_state_dict_saved_before_the_reshape_still_loads() -> None:
    """The pre-reshape format (no ``contradicted_steps``) loads, and resumes like the new one."""
    model = linreg_model()
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=0.95)
    gen = torch.Generator().manual_seed(9)
    run_steps(meter, model, gen, steps=5, sizes=[8, 8])
    new = meter.state_dict()
    old = {k: v for k, v in new.items() if k not in ("contradicted_steps", "settings")}
    assert set(old) == {"ema", "steps", "examples", "skipped_steps", "group_names", "param_group_names"}
    meter.load_state_dict(old)
    from_old = meter.compute()
    meter.load_state_dict(new)
    assert meter.compute() == from_old
    assert meter.state_dict()["contradicted_steps"].tolist() == [0, 0]


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"dataset_size": 64}, "dataset_size"),
        ({"accumulation": "sum"}, "accumulation"),
        ({"ema_decay": 0.9}, "ema_decay"),
        ({"ema_decay": None, "ema_examples": 100.0}, "ema_decay"),  # the other averaging form
    ],
)
def test_a_state_dict_is_refused_by_a_meter_that_measures_differently(
    kwargs: dict[str, object], setting: str
) -> None:
    """Resuming with another dataset_size, loss convention or averaging would mix steps measured two ways."""
    model = linreg_model()
    saved_by = GradientNoiseScale(model, method="microbatch", ema_decay=0.95)
    run_steps(saved_by, model, torch.Generator().manual_seed(3), steps=3, sizes=[8, 8])
    state = saved_by.state_dict()
    saved_by.remove()
    other = GradientNoiseScale(model, method="microbatch", **{"ema_decay": 0.95, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"saved with {setting}="):
        other.load_state_dict(state)
    same = GradientNoiseScale(model, method="microbatch", ema_decay=0.95)
    same.load_state_dict(state)  # the same settings load
    assert same.compute().steps == 3


def test_estimates_describe_themselves_rounded_in_their_unit() -> None:
    """Examples and logs print B_simple rounded, with its unit and interval, never raw floats."""
    model = linreg_model()
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=0.95, confidence=0.99)
    assert meter.compute().describe("images") == "B_simple not resolved"
    run_steps(meter, model, torch.Generator().manual_seed(4), steps=40, sizes=[8, 8])
    est = meter.compute()
    assert est.resolved and est.b_simple is not None and est.b_simple_ci is not None
    low, high = est.b_simple_ci
    expected = f"B_simple = {est.b_simple:.3g} tokens [{low:.3g}, {high:.3g}] (99%)"  # all below 100 here
    assert est.b_simple_ci[1] < 100
    assert est.describe("tokens", confidence=meter.confidence) == expected
    group = next(iter(est.groups.values()))
    assert group.describe("tokens", meter.confidence).startswith("B_simple")


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_the_meter_does_not_move_the_random_stream(method: str) -> None:
    """A run with the meter trains exactly as without it: same dropout masks, same data order."""
    from noisescale import _torch_compat

    _torch_compat.check.cache_clear()  # the first meter of a process runs the torch check
    model = linreg_model()
    before = torch.random.get_rng_state()
    meter = GradientNoiseScale(model, method=method)  # type: ignore[arg-type]
    run_steps(meter, model, torch.Generator().manual_seed(5), steps=3, sizes=[8, 8])
    meter.compute()
    meter.remove()
    assert torch.equal(before, torch.random.get_rng_state())


def test_state_dict_records_the_conventions_in_force_when_saved() -> None:
    """Integrations set the loss conventions after construction (the HF callback on a token-normalised
    loss): the saved settings are those in force, so a callback-built meter resumes from its own state."""
    model = linreg_model()
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=0.95)
    meter.accumulation = "example_mean"  # as NoiseScaleCallback._settle_unit does
    state = meter.state_dict()
    meter.remove()
    assert state["settings"]["accumulation"] == "example_mean"
    resumed = GradientNoiseScale(model, method="microbatch", ema_decay=0.95)
    with pytest.raises(ValueError, match="accumulation='example_mean'"):
        resumed.load_state_dict(state)
    resumed.accumulation = "example_mean"
    resumed.load_state_dict(state)
