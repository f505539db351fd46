"""The two routes of the LayerNorm / RMSNorm kernels (per_example/layernorm.py).

``sum_t go * x_hat`` comes either from the layer output (``(sum_t go * y - bias * sum_t go) /
weight``, on CPU when ``|bias| < 256 |weight|`` everywhere and the output is unchanged) or from
``x_hat`` recomputed from the input. Both are checked against per-example autograd in float64
(1e-10, see conftest), with the route actually taken counted; the output route's float32 error
against its derived bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from noisescale.per_example import PerExampleNorms, layernorm
from tests.per_example.conftest import assert_norms_match, per_example_loss_reference

N = 4
LAYERS: dict[str, Callable[[], nn.Module]] = {
    "layernorm": lambda: nn.LayerNorm(6),
    "layernorm-2d-shape": lambda: nn.LayerNorm((2, 3)),
    "layernorm-no-bias": lambda: nn.LayerNorm(6, bias=False),
    "rmsnorm": lambda: nn.RMSNorm(6),
}


def _randomise(layer: nn.Module, gen: torch.Generator) -> nn.Module:
    """Affine parameters of both signs, |weight| in [0.5, 1.5), bias ~ N(0, 1): |bias/weight| < ~8."""
    with torch.no_grad():
        w = layer.weight
        sign = torch.randint(0, 2, w.shape, generator=gen, dtype=w.dtype) * 2 - 1
        w.copy_(sign * (0.5 + torch.rand(w.shape, generator=gen, dtype=w.dtype)))
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen, dtype=w.dtype))
    return layer


@pytest.fixture
def routes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the output route taken / declined."""
    counts = {"taken": 0, "declined": 0}
    original = layernorm._from_output

    def counted(*args: Any) -> Any:
        out = original(*args)
        counts["taken" if out is not None else "declined"] += 1
        return out

    monkeypatch.setattr(layernorm, "_from_output", counted)
    return counts


def _run(layer: nn.Module, x: Tensor, *, in_place: bool = False) -> tuple[Tensor | None, Tensor]:
    """PerExampleNorms of ``layer`` (one group per parameter) and the autograd reference."""
    groups = [[p] for p in layer.parameters()]
    pe = PerExampleNorms(layer, groups)
    y = layer(x)
    if in_place:
        y.mul_(2.0)  # the kept output is no longer the layer's: the route must notice
    losses = (0.5 * (y - 0.3).square() + y.sin()).flatten(1).sum(1)
    losses.mean().backward(retain_graph=True)
    got = pe.pop()
    pe.remove()
    return got, per_example_loss_reference(losses, groups)


def _input(layer: nn.Module, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    shape = tuple(layer.normalized_shape)  # type: ignore[arg-type]
    return torch.randn(N, 3, *shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("route", ["output", "recompute"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_both_routes_are_exact(
    name: str, route: str, routes: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = _randomise(LAYERS[name]().double(), gen)
    if route == "recompute":
        monkeypatch.setattr(layernorm, "_from_output", lambda *args: None)
    got, expected = _run(layer, _input(layer, gen))
    assert_norms_match(got, expected)
    assert routes["taken"] == (1 if route == "output" else 0)


@pytest.mark.parametrize(
    ("weight", "bias"),
    [([1.0, 0.0, 1.0, 1.0, 1.0, 1.0], None), ([1.0] * 6, [0.1, 0.2, 300.0, 0.0, 0.0, 0.0])],
    ids=["zero-weight", "bias-300-weights"],
)
def test_ill_conditioned_layers_recompute(
    weight: list[float], bias: list[float] | None, routes: dict[str, int]
) -> None:
    """A zero weight (x_hat is lost in y) or |bias| >= 256 |weight| (cancellation): recompute, exact."""
    layer = nn.LayerNorm(6, bias=bias is not None).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    got, expected = _run(layer, _input(layer, torch.Generator().manual_seed(1)))
    assert_norms_match(got, expected)
    assert routes == {"taken": 0, "declined": 1}


def test_an_output_modified_in_place_is_not_used(routes: dict[str, int]) -> None:
    layer = _randomise(nn.LayerNorm(6).double(), torch.Generator().manual_seed(2))
    got, expected = _run(layer, _input(layer, torch.Generator().manual_seed(3)), in_place=True)
    assert_norms_match(got, expected)
    assert routes == {"taken": 0, "declined": 1}


def test_output_route_float32_error_within_its_bound(routes: dict[str, int]) -> None:
    """|bias/weight| up to 200 (below the 256 limit) in float32, against float64 truth.

    Bound (module docstring): the route's error per element is the recompute route's times at
    most 1 + 2 |bias/weight| <= 401, each a few float32 roundings u = 6e-8 of the terms, so an
    example's squared norm is off by at most ~2 * 3 * 401 u = 1.4e-4 relative; 5e-4 allows for
    the sums over 32 positions. The recompute route itself is checked at the same data.
    """
    gen = torch.Generator().manual_seed(4)
    layer = nn.LayerNorm(16)
    with torch.no_grad():
        layer.weight.copy_(0.5 + torch.rand(16, generator=gen))
        layer.bias.copy_(layer.weight * torch.linspace(-200.0, 200.0, 16))
    x = torch.randn(N, 32, 16, generator=gen)
    groups = [[layer.weight]]
    pe = PerExampleNorms(layer, groups)
    layer(x).sin().sum().backward()
    got = pe.pop()
    pe.remove()
    truth = _float64_truth(layer, x)
    assert routes == {"taken": 1, "declined": 0}
    assert got is not None
    rel = ((got[:, 0].double() - truth) / truth).abs().max().item()
    assert rel < 5e-4, rel


def _float64_truth(layer: nn.LayerNorm, x: Tensor) -> Tensor:
    """Per-example squared norms of the weight gradient of ``sum(sin(layer(x)))``, in float64."""
    ref = nn.LayerNorm(16).double()
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    rows = []
    for n in range(N):
        (g,) = torch.autograd.grad(ref(x[n : n + 1].double()).sin().sum(), [ref.weight])
        rows.append(g.square().sum())
    return torch.stack(rows)
