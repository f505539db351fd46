"""The per_example method of GradientNoiseScale, against microbatch and the oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisescale import GradientNoiseScale, SingleMicrobatchError, UnsupportedLayerError
from tests import oracle
from tests.meter.test_meter import linreg_model, run_steps


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16, dtype=torch.float64), nn.Tanh(), nn.Linear(16, 1, dtype=torch.float64)
    )


def test_per_example_equals_microbatches_of_one_example() -> None:
    """k = B micro-batches of one example ARE the per-example form: identical numbers."""
    results = []
    for method, sizes in [("per_example", [12]), ("microbatch", [1] * 12)]:
        model = mlp()
        meter = GradientNoiseScale(model, method=method, ema_decay=0.9)
        run_steps(meter, model, torch.Generator().manual_seed(0), steps=6, sizes=sizes)
        results.append(meter.compute())
    pe, mb = results
    # float64 round-off of two summation orders.
    assert pe.grad_norm_sq == pytest.approx(mb.grad_norm_sq, rel=1e-10)
    assert pe.trace_sigma == pytest.approx(mb.trace_sigma, rel=1e-10)
    for name in pe.groups:
        assert pe.groups[name].trace_sigma == pytest.approx(mb.groups[name].trace_sigma, rel=1e-10)


@pytest.mark.parametrize(
    ("reduction", "accumulation", "sizes"),
    [("mean", "mean", [8, 8]), ("sum", "sum", [8, 8]), ("sum", "mean", [4, 4, 4, 4])],
    ids=["mean-2mb", "sum-sum-2mb", "sum-mean-4mb"],
)
def test_per_example_is_independent_of_loss_conventions(
    reduction: str, accumulation: str, sizes: list[int]
) -> None:
    """Splitting a batch into equal micro-batches and rescaling the loss leaves every number unchanged."""
    results = []
    for red, acc, sz in [("mean", "mean", [16]), (reduction, accumulation, sizes)]:
        model = mlp()
        meter = GradientNoiseScale(
            model, method="per_example", reduction=red, accumulation=acc, ema_decay=1.0
        )
        run_steps(
            meter, model, torch.Generator().manual_seed(1), steps=5, sizes=sz, reduction=red, accumulation=acc
        )
        results.append(meter.compute())
    assert results[1].grad_norm_sq == pytest.approx(results[0].grad_norm_sq, rel=1e-10)
    assert results[1].trace_sigma == pytest.approx(results[0].trace_sigma, rel=1e-10)


def test_both_methods_cover_the_oracle_truth() -> None:
    """Same examples, both estimators: their 95% intervals contain B_simple = 7.408.

    Any single seed misses with ~5% chance, so run 20 independent seeds and require at
    least 15 hits per method: for a calibrated interval P(hits < 15) = 3e-4 (binomial,
    p = 0.95). Calibration itself is tested over 1000 repeats in test_uncertainty.py.
    """
    for method, sizes in [("per_example", [32]), ("microbatch", [8] * 4)]:
        hits = 0
        for seed in range(20):
            model = linreg_model()
            meter = GradientNoiseScale(model, method=method, ema_decay=1.0)
            run_steps(meter, model, torch.Generator().manual_seed(seed), steps=40, sizes=sizes)
            est = meter.compute()
            assert est.resolved, (method, seed)
            hits += est.b_simple_ci[0] <= oracle.B_SIMPLE <= est.b_simple_ci[1]
        assert hits >= 15, (method, hits)


def test_per_example_with_grad_scaler() -> None:
    ref_model, model = mlp(), mlp()
    ref = GradientNoiseScale(ref_model, method="per_example", ema_decay=0.9)
    run_steps(ref, ref_model, torch.Generator().manual_seed(3), steps=5, sizes=[8])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    meter = GradientNoiseScale(model, method="per_example", ema_decay=0.9, scaler=scaler)
    run_steps(
        meter,
        model,
        torch.Generator().manual_seed(3),
        steps=5,
        sizes=[8],
        scaler=scaler,
        scales=[4.0, 2.0**20],
    )
    assert meter.compute().trace_sigma == pytest.approx(ref.compute().trace_sigma, rel=1e-9)


def test_batch_of_one_raises() -> None:
    model = mlp()
    meter = GradientNoiseScale(model, method="per_example")
    with pytest.raises(SingleMicrobatchError, match="at least 2"):
        run_steps(meter, model, torch.Generator().manual_seed(4), steps=1, sizes=[1])


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(UnsupportedLayerError, match="BatchNorm1d"):
        GradientNoiseScale(model, method="per_example")
    GradientNoiseScale(model, method="per_example", fallback=True).remove()


def test_batch_size_mismatch_is_explained() -> None:
    model = mlp()
    meter = GradientNoiseScale(model, method="per_example")
    x, y = oracle.sample_xy((8,), torch.Generator().manual_seed(5))
    (0.5 * (model(x).squeeze(-1) - y).square().mean()).backward()
    with pytest.raises(ValueError, match="saw 8 examples"):
        meter.update(batch_size=16)
