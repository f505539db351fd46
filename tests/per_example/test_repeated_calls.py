"""A layer applied several times in one forward (siamese pairs, a block reused, a recurrence) stays exact.

The per-example gradient of a reused layer is the sum of its uses' contributions, so the norm must be taken
after summing them. A regression (issue 13 review) took the per-use path for exactly two calls: the calls were
counted after the first was consumed. Reference: an explicit loop of per-example gradients in float64, so the
comparison is exact up to rounding (rel 1e-9).
"""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from noisescale import GradientNoiseScale

N, D = 10, 6


def exact_parts(model: nn.Module, loss_of: Callable[[slice], torch.Tensor]) -> tuple[float, float]:
    """Unbiased |G|^2 and tr(Sigma) of the N per-example gradients (eq. A.1-A.2, B_small 1, B_big N)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(N):
        grads = torch.autograd.grad(loss_of(slice(i, i + 1)), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    g = torch.stack(rows)  # [N, P]
    mean = g.mean(0)
    grad_norm_sq = (N * mean.square().sum() - g.square().sum(1).mean()) / (N - 1)
    trace_sigma = (g - mean).square().sum() / (N - 1)
    return float(grad_norm_sq), float(trace_sigma)


def assert_meter_is_exact(
    model: nn.Module, loss_of: Callable[[slice], torch.Tensor], **options: bool
) -> None:
    """One full-batch per_example step equals the exact per-example loop, to float64 rounding (rel 1e-9)."""
    meter = GradientNoiseScale(model, method="per_example", ema_decay=1.0, **options)
    loss_of(slice(None)).backward()
    meter.update()
    est = meter.compute()
    meter.remove()
    grad_norm_sq, trace_sigma = exact_parts(model, loss_of)
    assert est.grad_norm_sq == pytest.approx(grad_norm_sq, rel=1e-9)
    assert est.trace_sigma == pytest.approx(trace_sigma, rel=1e-9)


def cell_of(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "linear":  # has a kernel
        return nn.Linear(D, D).double()
    return nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D)).double()  # BatchNorm: the fallback path


@pytest.mark.parametrize("kind", ["linear", "fallback"])
@pytest.mark.parametrize("uses", [1, 2, 3])
def test_layer_applied_several_times_is_exact(kind: str, uses: int) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(N, D, dtype=torch.float64), torch.randn(N, 1, dtype=torch.float64)
    cell = cell_of(kind)
    if kind == "fallback":
        cell.eval()  # BatchNorm in eval: per-example losses are independent

    def loss_of(rows: slice) -> torch.Tensor:
        h = x[rows]
        for _ in range(uses):
            h = torch.tanh(cell(h))
        return (h.sum(1, keepdim=True) - y[rows]).square().mean()

    assert_meter_is_exact(cell, loss_of, fallback=kind == "fallback")


def test_siamese_pair_is_exact() -> None:
    """Two inputs through one encoder, a loss on both: the encoder's two calls sum per example."""
    torch.manual_seed(0)
    a, b = torch.randn(N, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 4)).double()

    def loss_of(rows: slice) -> torch.Tensor:
        return (encoder(a[rows]) - encoder(b[rows])).square().sum(1).mean()

    assert_meter_is_exact(encoder, loss_of)
