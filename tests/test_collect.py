"""The recorder's per-backward squared norms against a direct computation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from noisescale.collect import EAGER_NUMEL, GradientRecorder


class TwoHeads(nn.Module):
    """A large trunk (normed in its hook), two small heads (one unused at times), a scalar temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(256, 160, dtype=torch.float64)  # 40,960 weights: eager
        self.head_a = nn.Linear(160, 3, dtype=torch.float64)
        self.head_b = nn.Linear(160, 2, dtype=torch.float64)
        self.temperature = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))  # 0-d, like CLIP's

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        out = self.head_a(h).square().mean() * self.temperature
        return out + self.head_b(h).square().mean() if use_b else out


@pytest.mark.parametrize("use_b", [True, False], ids=["all-parameters", "one-head-unused"])
def test_records_are_the_squared_norms_of_each_backward(use_b: bool) -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    reference = copy.deepcopy(model)  # no hooks: its gradients are the expected ones
    params = list(model.parameters())
    assert [p.numel() >= EAGER_NUMEL for p in params].count(True) == 1
    recorder = GradientRecorder(params)
    expected = []
    for x in torch.randn(3, 5, 256, dtype=torch.float64):
        grads = torch.autograd.grad(reference(x, use_b), list(reference.parameters()), allow_unused=True)
        expected.append(
            torch.stack(
                [torch.zeros((), dtype=torch.float64) if g is None else g.square().sum() for g in grads]
            )
        )
        model(x, use_b).backward()
    records = recorder.pop()
    assert len(records) == 3
    torch.testing.assert_close(recorder.sq_norms(records), torch.stack(expected), rtol=1e-12, atol=0.0)
    big = torch.stack(
        [
            p.grad.square().sum() if p.grad is not None else torch.zeros((), dtype=torch.float64)
            for p in params
        ]
    )
    torch.testing.assert_close(recorder.accumulated_sq_norms(), big, rtol=1e-12, atol=0.0)
    step = recorder.sq_norms(records, big=True)  # the whole step at once: the big batch last
    torch.testing.assert_close(step, torch.cat([torch.stack(expected), big[None]]), rtol=1e-12, atol=0.0)
    recorder.remove()


@pytest.mark.parametrize("rows", [40, 5000], ids=["small-table", "large-table"])
def test_sparse_gradients_have_the_norms_of_their_dense_twins(rows: int) -> None:
    """nn.Embedding(sparse=True): repeated indices sum before the norm, as in the dense gradient."""
    torch.manual_seed(0)
    sparse = nn.Embedding(rows, 8, sparse=True, dtype=torch.float64)
    dense = nn.Embedding(rows, 8, dtype=torch.float64)
    dense.weight.data.copy_(sparse.weight.data)
    assert (sparse.weight.numel() >= EAGER_NUMEL) == (rows == 5000)
    recorders = [GradientRecorder([m.weight]) for m in (sparse, dense)]
    for idx in torch.randint(0, 4, (2, 6, 3)):  # few distinct rows: many repeats
        for m in (sparse, dense):
            m(idx).square().sum().backward()
    got, want = (r.sq_norms(r.pop()) for r in recorders)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(
        recorders[0].accumulated_sq_norms(), recorders[1].accumulated_sq_norms(), rtol=1e-12, atol=0.0
    )


def _scaled_run(method: str, scale: float | None, *, accumulate: int) -> tuple[float, float, int]:
    """(|G|^2, tr Sigma, skipped steps) of a float32 model, 12 steps at lr 0, with a fixed AMP scale.

    The model is float32 with a large (eagerly normed) first layer and small ones (normed
    together), so every norm path sees the scale.
    """
    from noisescale.meter import GradientNoiseScale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 160), nn.Tanh(), nn.Linear(160, 1))
    assert model[0].weight.numel() >= EAGER_NUMEL
    gen = torch.Generator().manual_seed(1)
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**9)
    meter = GradientNoiseScale(model, method=method, ema_decay=1.0, scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(12):
        x = torch.randn(16, 256, generator=gen)
        y = x[:, :4].sum(1, keepdim=True) + torch.randn(16, 1, generator=gen)
        for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate), strict=True):
            loss = (model(xs) - ys).square().mean() / accumulate
            (loss if scaler is None else scaler.scale(loss)).backward()
        meter.update(16)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update(new_scale=scale)  # hold the scale: GradScaler's back-off reaches 2**-70 too
        opt.zero_grad()
    est = meter.compute()
    return est.grad_norm_sq, est.trace_sigma, est.skipped_steps


@pytest.mark.parametrize(
    "scale", [2.0**-70, 2.0**64, 2.0**-20, 2.0**100], ids=["2^-70", "2^64", "2^-20", "2^100"]
)
@pytest.mark.parametrize(
    ("method", "accumulate"), [("microbatch", 4), ("per_example", 1), ("per_example", 2)]
)
def test_extreme_grad_scaler_scales_give_the_unscaled_estimates(
    method: str, accumulate: int, scale: float
) -> None:
    """Issue 13 #3: at 2**-70 the squared norms underflowed float32 (per_example 9% low, CI
    excluding the truth), at 2**64 they overflowed and every step was skipped. A power-of-two
    scale is exact in floating point and the gradients are unscaled before any square, so the
    estimates equal the unscaled run's up to the order of float64 operations: 1e-9 relative
    (an underflow or a lost step changes them by far more)."""
    truth = _scaled_run(method, None, accumulate=accumulate)
    got = _scaled_run(method, scale, accumulate=accumulate)
    assert got[2] == 0, "steps with finite gradients were counted as skipped"
    assert got[0] == pytest.approx(truth[0], rel=1e-9)
    assert got[1] == pytest.approx(truth[1], rel=1e-9)


def test_norm_unscales_before_squaring() -> None:
    """Half, strided and contiguous float32 gradients scaled by 2**-70 and 2**64: the unscaled
    squared norm to float32 round-off (1e-6), never 0 or inf; also on the BLAS dot route (2**20
    elements), whose squared norm comes back through its square root."""
    from noisescale.collect import DOT_NUMEL, norm, squared_norms

    def squared_norm(tensor: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        return norm(tensor, inv).double().square()

    big = torch.randn(DOT_NUMEL, generator=torch.Generator().manual_seed(1))
    for scale in (2.0**-70, 2.0**64):
        got = squared_norm(big * scale, torch.tensor(1.0 / scale)).item()
        assert got == pytest.approx(big.double().square().sum().item(), rel=1e-6)
    g = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    truth = g.double().square().sum().item()
    for scale in (2.0**-70, 2.0**64):
        s = torch.tensor(scale)
        inv = torch.tensor(1.0 / scale)  # a power of two: 1/s is exact in float32
        for tensor in (g * s, (g * s).to(memory_format=torch.channels_last)):
            assert squared_norm(tensor, inv).item() == pytest.approx(truth, rel=1e-6)
        small = [g[0, 0] * s, g[1, 0, 0] * s]
        expected = (
            torch.stack([small[0].double().square().sum(), small[1].double().square().sum()]) / scale**2
        )
        torch.testing.assert_close(squared_norms(small, inv), expected, rtol=1e-6, atol=0.0)
    half = (g * 2.0**-10).half()  # a float16 gradient under a small scale: normed in float32 first
    assert squared_norm(half, torch.tensor(2.0**10)).item() == pytest.approx(
        half.double().square().sum().item() * 2.0**20, rel=1e-6
    )
