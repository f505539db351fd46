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
