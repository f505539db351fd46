"""Forward passes that are pending (graph alive, not backpropagated into .grad) cost their
own activations only (issue 13 #8).

Evaluation probes and penalties consumed by ``torch.autograd.grad`` used to stay counted
as calls until the next ``backward()``; with two of them the layer hooks switched to
materialising ``[N, *P]`` per-example gradients (two 3,000-image probes peaked at 6 GB).
The tests spy on what the collector forms and holds.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from noisescale.per_example import PerExampleNorms

F64 = torch.float64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(F64)


def losses(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).square().sum(1)  # [N]


def batch(seed: int, n: int = 8) -> Tensor:
    return torch.randn(n, 6, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def materialised(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of every per-example gradient the collector forms (the materialising path)."""
    formed: list[int] = []
    add_grads = PerExampleNorms._add_grads

    def spy(self: PerExampleNorms, unit: object, grads: dict[str, Tensor]) -> None:
        formed.extend(g.numel() * g.element_size() for g in grads.values())
        add_grads(self, unit, grads)  # type: ignore[arg-type]

    monkeypatch.setattr(PerExampleNorms, "_add_grads", spy)
    return formed


def held_tensors(pe: PerExampleNorms) -> int:
    """Tensors the collector holds between backward passes (norm parts and per-example gradients)."""
    return sum(len(v) for v in pe._parts.values()) + sum(len(v) for v in pe._grads.values())


def test_probes_consumed_by_autograd_grad_cost_nothing(
    materialised: list[int], per_example_reference: Callable, check_norms: Callable
) -> None:
    model = mlp()
    params = list(model.parameters())
    pe = PerExampleNorms(model, [params])
    probes = [losses(model, batch(seed, 300)).mean() for seed in (1, 2)]  # two pending probes
    for probe in probes:
        torch.autograd.grad(probe, params)
    assert materialised == []  # before the fix: two [300, 16, 6] and two [300, 3, 16] tensors...
    assert held_tensors(pe) == 0  # ... and their norms, held until the next pop()
    train = losses(model, batch(3))
    train.mean().backward(retain_graph=True)
    got = pe.pop()
    assert materialised == []
    check_norms(got, per_example_reference(train, [params]))
    pe.remove()


def test_a_dropped_forward_does_not_count(materialised: list[int]) -> None:
    """A forward with gradients enabled whose outputs are dropped (an evaluation loop that forgot
    torch.no_grad()) no longer makes the next backward materialise."""
    model = mlp()
    pe = PerExampleNorms(model, [list(model.parameters())])
    for seed in (1, 2):
        losses(model, batch(seed, 300)).mean().item()
    losses(model, batch(3)).mean().backward()
    assert pe.pop() is not None
    assert materialised == []
    pe.remove()


def test_pending_graphs_backpropagated_later_stay_exact(
    per_example_reference: Callable, check_norms: Callable
) -> None:
    """Two forwards, then two backward passes: the second graph calls the first layer twice and
    must still take the materialising path (before the fix, the first backward reset the count
    and the second graph's twice-used layer got the sum of its calls' norms: a wrong number)."""
    model = mlp()
    params = list(model.parameters())
    pe = PerExampleNorms(model, [params])
    a = losses(model, batch(1))
    first = model[0]
    x = batch(2)
    b = (model[2](torch.tanh(first(x))) + model[2](torch.tanh(first(x * 0.5)))).square().sum(1)
    a.mean().backward()
    pe.pop()
    b.mean().backward(retain_graph=True)
    got = pe.pop()
    check_norms(got, per_example_reference(b, [params]))
    pe.remove()
