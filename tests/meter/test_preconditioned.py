"""The preconditioned noise scale of GradientNoiseScale: closed form, Adam by brute force, results, resume."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from noisescale import GradientNoiseScale, NoiseScaleEstimate
from noisescale.estimators import microbatch_stats, per_example_stats
from tests import oracle
from tests.meter.test_meter import linreg_model, run_steps

METHODS = [("microbatch", [8] * 4), ("per_example", [32])]
IDS = ["microbatch", "per_example"]


def _oracle_weights(
    model: nn.Module, p: torch.Tensor = oracle.PRECONDITIONER
) -> dict[torch.Tensor, torch.Tensor]:
    return {model.weight: p[None].clone()}


@pytest.mark.parametrize(("method", "sizes"), METHODS, ids=IDS)
def test_fixed_preconditioner_matches_the_closed_form(method: str, sizes: list[int]) -> None:
    """B_P within 4 standard errors of tr(P Sigma)/(G^T P G) = 9.5927 (false failure: 6e-5); raw unchanged."""
    model = linreg_model()
    meter = GradientNoiseScale(model, method=method, ema_decay=1.0, preconditioner=_oracle_weights(model))
    run_steps(meter, model, torch.Generator().manual_seed(0), steps=200, sizes=sizes)
    plain_model = linreg_model()
    plain = GradientNoiseScale(plain_model, method=method, ema_decay=1.0)  # the same steps, no preconditioner
    run_steps(plain, plain_model, torch.Generator().manual_seed(0), steps=200, sizes=sizes)
    est = meter.compute()
    pre = est.preconditioned
    assert pre is not None and pre.resolved and pre.contradiction is None
    _, _, b_p = oracle.preconditioned_truth()
    assert pre.b_simple is not None and pre.b_simple_se is not None
    assert abs(pre.b_simple - b_p) < 4 * pre.b_simple_se
    assert pre.steps == est.steps == 200 and pre.examples == est.examples and pre.skipped_steps == 0
    assert pre.groups == {} and pre.param_groups == {} and pre.preconditioned is None
    ref = plain.compute()  # the raw estimate does not depend on the preconditioner
    for key in ("grad_norm_sq", "trace_sigma", "b_simple", "b_simple_se"):
        assert getattr(est, key) == pytest.approx(getattr(ref, key), rel=1e-12, abs=0.0), key
    assert ref.preconditioned is None and ref.to_dict()["preconditioned"] is None


@pytest.mark.parametrize(("method", "sizes"), METHODS, ids=IDS)
def test_unit_weights_reproduce_the_raw_estimate(method: str, sizes: list[int]) -> None:
    """P = 1: the same squared norms (microbatch: bit for bit; per_example: other float64 sums of them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    ones = {p: torch.ones_like(p) for p in model.parameters()}
    meter = GradientNoiseScale(model, method=method, ema_decay=0.9, preconditioner=ones)
    run_steps(meter, model, torch.Generator().manual_seed(1), steps=12, sizes=sizes)
    est = meter.compute()
    pre = est.preconditioned
    assert pre is not None and est.resolved
    rel = 0.0 if method == "microbatch" else 1e-12
    for key in ("grad_norm_sq", "trace_sigma", "b_simple", "b_simple_se", "resolved", "n_eff"):
        assert getattr(pre, key) == pytest.approx(getattr(est, key), rel=rel, abs=0.0), key
    assert pre.b_simple_ci == pytest.approx(est.b_simple_ci, rel=rel, abs=0.0)


def _adam_weights(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
    """Adam's 1/(sqrt(v_hat) + eps) recomputed from its state; None before it has any."""
    if not opt.state:
        return None
    out = []
    for p in params:
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
        out.append(1.0 / (v_hat.sqrt() + group["eps"]))
    return out


def _weighted(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    return sum((w * g.square()).sum() for g, w in zip(grads, weights, strict=True))  # type: ignore[return-value]


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_adam_matches_a_brute_force_recomputation(method: str) -> None:
    """Every step's G^T P G and tr(P Sigma) by hand: P from the AdamW state, per-example or micro-batch
    gradients by autograd, the estimators' pure functions; the meter's plain mean equals their mean
    over the steps Adam had state for (float64 sums in another order: 1e-10)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "eps": 1e-4}], lr=0.05
    )
    meter = GradientNoiseScale(model, method=method, ema_decay=1.0, optimizer=opt, preconditioner="adam")
    gen = torch.Generator().manual_seed(2)
    k, b = 3, 4
    expected = []
    for _ in range(6):
        weights = _adam_weights(opt, params)
        x, y = oracle.sample_xy((k * b,), gen)
        losses = [
            0.5 * (model(xb).squeeze(-1) - yb).square() for xb, yb in zip(x.split(b), y.split(b), strict=True)
        ]
        if method == "microbatch":
            units = [loss.mean() for loss in losses]  # each micro-batch's mean loss
        else:
            units = [one for loss in losses for one in loss]  # each example's loss
        grads = [torch.autograd.grad(u, params, retain_graph=True) for u in units]
        for loss in losses:  # the training loop: k backward passes of loss / k
            (loss.mean() / k).backward()
        meter.update(k * b)
        if weights is not None:
            mean = [torch.stack(g).mean(0) for g in zip(*grads, strict=True)]
            small = torch.stack([_weighted(list(g), weights) for g in grads])
            if method == "microbatch":
                st = microbatch_stats(
                    small, torch.full((k,), float(b)), _weighted(mean, weights), torch.tensor(k * b)
                )
            else:
                st = per_example_stats(small.mean(), _weighted(mean, weights), k * b)
            expected.append((float(st.grad_norm_sq), float(st.trace_sigma)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    est = meter.compute()
    pre = est.preconditioned
    assert pre is not None and est.skipped_steps == 0
    assert pre.steps == 6 and pre.skipped_steps == 1  # the first step: no second moment yet
    assert pre.grad_norm_sq == pytest.approx(sum(g for g, _ in expected) / 5, rel=1e-10)
    assert pre.trace_sigma == pytest.approx(sum(s for _, s in expected) / 5, rel=1e-10)
    assert math.isfinite(est.grad_norm_sq) and est.grad_norm_sq != pytest.approx(pre.grad_norm_sq)


def _trained(preconditioner: Any, **kwargs: Any) -> tuple[GradientNoiseScale, nn.Module]:
    model = linreg_model()
    spec = preconditioner(model) if callable(preconditioner) else preconditioner
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=0.9, preconditioner=spec, **kwargs)
    run_steps(meter, model, torch.Generator().manual_seed(3), steps=30, sizes=[8, 8])
    return meter, model


def test_results_carry_the_preconditioned_estimate_in_dict_json_and_describe() -> None:
    meter, _ = _trained(_oracle_weights)
    est = meter.compute()
    d = json.loads(json.dumps(est.to_dict()))  # JSON-ready
    assert d["preconditioned"]["b_simple"] == pytest.approx(est.preconditioned.b_simple)
    assert set(d["preconditioned"]) == set(NoiseScaleEstimate._fields)
    assert d["preconditioned"]["groups"] == {} and d["preconditioned"]["preconditioned"] is None
    assert d["b_simple"] == pytest.approx(est.b_simple)  # next to the raw value, never instead
    text = est.describe("images")
    raw, pre = text.split("; preconditioned: ")
    assert raw == est._replace(preconditioned=None).describe("images")
    assert pre.startswith("B_simple = ") and pre.endswith("(95%)") and "images" in pre


def test_state_dict_round_trip_and_refusals() -> None:
    meter, model = _trained(_oracle_weights)
    buffer = io.BytesIO()
    torch.save(meter.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["settings"]["preconditioner"] == "mapping" and "preconditioned" in saved
    resumed = GradientNoiseScale(
        model, method="microbatch", ema_decay=0.9, preconditioner=_oracle_weights(model)
    )
    resumed.load_state_dict(saved)
    for m in (meter, resumed):
        run_steps(m, model, torch.Generator().manual_seed(4), steps=5, sizes=[8, 8])
    assert resumed.compute().to_dict() == meter.compute().to_dict()  # exact: the same sums in the same order

    plain = GradientNoiseScale(model, method="microbatch", ema_decay=0.9)
    with pytest.raises(ValueError, match="preconditioner='mapping' but this meter has preconditioner=None"):
        plain.load_state_dict(saved)
    with pytest.raises(ValueError, match="saved by a meter with no preconditioner but this meter has a"):
        resumed.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "settings"})
    opt = torch.optim.Adam(model.parameters())
    adam = GradientNoiseScale(model, method="microbatch", ema_decay=0.9, optimizer=opt, preconditioner="adam")
    with pytest.raises(ValueError, match="preconditioner='mapping' but this meter has preconditioner='adam'"):
        adam.load_state_dict(saved)


def test_reset_and_compute_before_any_step() -> None:
    meter, _ = _trained(_oracle_weights)
    meter.reset()
    pre = meter.compute().preconditioned
    assert pre is not None and pre.steps == 0 and not pre.resolved and math.isnan(pre.grad_norm_sq)


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_grad_scaler_and_clipping_before_update(method: str) -> None:
    """AMP-scaled gradients are unscaled before weighting; read_grad='after_backward' ignores clipping."""
    sizes = [8, 8] if method == "microbatch" else [16]

    def run(scaled: bool, clip: bool) -> NoiseScaleEstimate:
        model = linreg_model()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
        meter = GradientNoiseScale(
            model,
            method=method,
            ema_decay=0.9,
            scaler=scaler,
            preconditioner=_oracle_weights(model),
            read_grad="after_backward" if clip else "at_update",
        )
        if clip:  # clip every .grad right before update(): the snapshot after backward is what counts
            update = meter.update

            def clipped(*args: Any, **kwargs: Any) -> None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
                update(*args, **kwargs)

            meter.update = clipped  # type: ignore[method-assign]
        run_steps(
            meter,
            model,
            torch.Generator().manual_seed(5),
            steps=12,
            sizes=sizes,
            scaler=scaler,
            scales=[2.0**3, 2.0**17, 1.0],
        )
        return meter.compute()

    ref = run(False, False).preconditioned
    for scaled, clip in ((True, False), (False, True)):
        got = run(scaled, clip).preconditioned
        assert got is not None and ref is not None
        assert got.grad_norm_sq == pytest.approx(ref.grad_norm_sq, rel=1e-9)
        assert got.trace_sigma == pytest.approx(ref.trace_sigma, rel=1e-9)


@pytest.mark.parametrize("method", ["microbatch", "per_example"])
def test_sparse_embedding_equals_dense(method: str) -> None:
    """nn.Embedding(sparse=True): the weighted norms of its sparse .grad and per-example rows."""

    def run(sparse: bool) -> NoiseScaleEstimate:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(7, 3, sparse=sparse), nn.Flatten(), nn.Linear(6, 1)).double()
        weights = {
            p: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
            for i, p in enumerate(model.parameters())
        }
        meter = GradientNoiseScale(model, method=method, ema_decay=0.9, preconditioner=weights)
        gen = torch.Generator().manual_seed(6)
        for _ in range(6):
            idx, y = (
                torch.randint(0, 7, (12, 2), generator=gen),
                torch.randn(12, generator=gen, dtype=torch.float64),
            )
            for part, target in zip(idx.split(6), y.split(6), strict=True):
                (0.5 * (model(part).squeeze(-1) - target).square().mean() / 2).backward()
            meter.update(12)
            model.zero_grad(set_to_none=True)
        return meter.compute()

    dense, sparse = run(False).preconditioned, run(True).preconditioned
    assert dense is not None and sparse is not None
    assert sparse.grad_norm_sq == pytest.approx(dense.grad_norm_sq, rel=1e-12)
    assert sparse.trace_sigma == pytest.approx(dense.trace_sigma, rel=1e-12)


def _make(model: nn.Module, spec: Callable[[nn.Module], Any], opt: Any = None) -> GradientNoiseScale:
    return GradientNoiseScale(model, method="microbatch", optimizer=opt, preconditioner=spec(model))


def test_bad_preconditioners_fail_at_construction() -> None:
    model = linreg_model()
    with pytest.raises(ValueError, match=r"pass preconditioner=\{parameter: weights\}"):
        _make(model, lambda m: "adam", torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no weights for parameter weight"):
        _make(model, lambda m: {})
