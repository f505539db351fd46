"""Construction errors, hook life cycle and dtype handling of PerExampleNorms (per_example/collector.py)."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from noisescale.errors import UnsupportedLayerError
from noisescale.per_example import PerExampleNorms, find_kernel, register_kernel, registry
from noisescale.per_example import linear as linear_kernel

F64 = torch.float64
N = 4


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)


def all_params(model: nn.Module) -> list[list[nn.Parameter]]:
    return [list(model.parameters())]


class OwnParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


def linear_with_extra() -> nn.Module:
    lin = nn.Linear(3, 3)
    lin.extra = nn.Parameter(torch.ones(3))
    return lin


@pytest.mark.parametrize(
    ("layer", "named"),
    [
        (lambda: nn.BatchNorm1d(3), "'bad' (BatchNorm1d)"),
        (OwnParam, "'bad' (OwnParam)"),
        (lambda: nn.Conv3d(3, 3, 1), "'bad' (Conv3d)"),
        (linear_with_extra, "'bad' (Linear with extra parameters ['extra'])"),
    ],
    ids=["batchnorm", "custom-own-parameter", "conv3d", "linear-extra-parameter"],
)
def test_unsupported_layers_are_named_with_the_fix(layer: Callable[[], nn.Module], named: str) -> None:
    model = nn.Sequential(OrderedDict(ok=nn.Linear(3, 3), bad=layer()))
    with pytest.raises(UnsupportedLayerError) as info:
        PerExampleNorms(model, all_params(model))
    message = str(info.value)
    assert named in message
    assert "'ok'" not in message
    assert "fallback=True" in message
    assert "GroupNorm" in message


def test_unsupported_layers_outside_groups_or_frozen_are_fine(
    masked_reference: Callable, check_norms: Callable
) -> None:
    """BatchNorm left out of the groups or frozen needs no kernel: construction succeeds, the
    groups' norms are exact (the masked-output reference, valid with BatchNorm) and the frozen
    group's column is zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2), nn.BatchNorm1d(2)).to(F64)
    model[3].requires_grad_(False)
    groups = [list(model[0].parameters()), list(model[2].parameters()), list(model[3].parameters())]
    pe = PerExampleNorms(model, groups)
    h0 = model[0](torch.randn(N, 3, dtype=F64))
    h2 = model[2](model[1](h0))
    loss = model[3](h2).square().sum()
    loss.backward(retain_graph=True)
    got = pe.pop()
    pe.remove()
    assert got is not None and got.shape == (N, 3)
    assert torch.all(got[:, 2] == 0)  # the frozen BatchNorm's group
    expected = masked_reference(
        loss, [(h0, list(model[0].parameters())), (h2, list(model[2].parameters()))], groups
    )
    check_norms(got[:, :2], expected[:, :2])


def test_group_validation() -> None:
    model, other = mlp(), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not parameters of `model`"):
        PerExampleNorms(model, [list(model.parameters()), [other.weight]])
    with pytest.raises(ValueError, match="in groups 0 and 1"):
        PerExampleNorms(model, [[model[0].weight], [model[0].weight]])
    with pytest.raises(TypeError, match=r"`groups\[0\]`"):
        PerExampleNorms(model, [["weight"]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        PerExampleNorms(model.parameters(), [[]])  # type: ignore[arg-type]


def test_pop_life_cycle() -> None:
    model = mlp()
    pe = PerExampleNorms(model, all_params(model))
    assert pe.pop() is None
    with torch.no_grad():
        model(torch.randn(N, 5, dtype=F64))
    assert pe.pop() is None  # no hook registered under no_grad
    model(torch.randn(N, 5, dtype=F64)).sum().backward()
    first = pe.pop()
    assert first is not None
    assert first.shape == (N, 1)
    assert first.dtype == F64
    assert pe.pop() is None  # reset
    pe.remove()
    model(torch.randn(N, 5, dtype=F64)).sum().backward()
    assert pe.pop() is None  # hooks gone


@pytest.mark.parametrize("fallback", [False, True], ids=["kernel", "fallback"])
def test_layer_inputs_are_freed_with_the_graph(fallback: bool) -> None:
    """A layer's input is released once its hook has run, unless backward keeps the graph, in
    which case a second backward gives the same norms; a second backward through a freed graph
    raises."""
    torch.manual_seed(0)
    first, norm, head = nn.Linear(3, 4), nn.BatchNorm1d(4) if fallback else nn.LayerNorm(4), nn.Linear(4, 2)
    model = nn.Sequential(first, norm, head).to(F64)
    pe = PerExampleNorms(model, all_params(model), fallback=fallback)

    def loss_and_input() -> tuple[Tensor, weakref.ref[Tensor]]:
        h = first(torch.randn(N, 3, dtype=F64)) * 2.0  # saved by the norm layer only
        return head(norm(h)).square().sum(), weakref.ref(h)

    loss, h = loss_and_input()
    loss.backward(retain_graph=True)
    assert h() is not None
    kept = pe.pop()
    loss.backward()
    if not fallback:  # (the fallback saves a detached alias of h, freed the same way)
        assert h() is None  # freed while the graph (held by `loss`) is still alive
    torch.testing.assert_close(pe.pop(), kept)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    pe.remove()


def test_unbatched_input_is_rejected() -> None:
    conv = nn.Conv1d(2, 3, 2)
    pe = PerExampleNorms(conv, all_params(conv))
    with pytest.raises(ValueError, match="batch dimension"):
        conv(torch.randn(2, 5))
    pe.remove()


class LearnedQuery(nn.Module):
    """A layer applied to a [1, F] parameter-derived tensor: not decomposable per example."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 3))
        self.proj = nn.Linear(3, 3)
        self.body = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) * self.proj(self.query)


def test_layers_disagreeing_on_the_batch_size_raise() -> None:
    model = LearnedQuery()
    pe = PerExampleNorms(model, [list(model.proj.parameters()), list(model.body.parameters())])
    model(torch.randn(N, 3)).sum().backward()
    with pytest.raises(RuntimeError, match=r"'proj' \(Linear\) saw 1 examples|'proj' \(Linear\) saw 1 in"):
        pe.pop()
    pe.remove()


def test_register_kernel_for_a_subclass(monkeypatch: pytest.MonkeyPatch) -> None:
    class MyLinear(nn.Linear):
        pass

    monkeypatch.setattr(registry, "_KERNELS", dict(registry._KERNELS))  # undo the registration afterwards

    model = nn.Sequential(MyLinear(3, 2))
    with pytest.raises(UnsupportedLayerError, match="MyLinear"):
        PerExampleNorms(model, all_params(model))
    register_kernel(MyLinear, linear_kernel.KERNEL)
    assert find_kernel(model[0]) is linear_kernel.KERNEL
    pe = PerExampleNorms(model, all_params(model))
    model(torch.randn(N, 3)).sum().backward()
    assert pe.pop() is not None
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_kernel(int, linear_kernel.KERNEL)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Kernel"):
        register_kernel(MyLinear, object())  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_reduces_in_float32(dtype: torch.dtype) -> None:
    """Half gradients are squared in float32: no overflow (squares here reach ~1e9, far above
    fp16's 65504), and the numbers match norms of the half model's own per-example gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3)).to(dtype)
    params = list(model.parameters())
    pe = PerExampleNorms(model, [[p] for p in params])
    losses = 100.0 * model(torch.randint(0, 7, (N, 5))).float().square().sum((1, 2))  # as under loss scaling
    losses.sum().backward(retain_graph=True)
    got = pe.pop()
    expected = torch.stack(
        [
            torch.stack(
                [g.double().square().sum() for g in torch.autograd.grad(loss, params, retain_graph=True)]
            )
            for loss in losses
        ]
    )
    assert got is not None
    assert got.dtype == torch.float32
    assert bool(torch.isfinite(got).all())
    assert float(got.max()) > 65504
    # The kernels see the same half gradients as backward but sum in float32 where backward sums
    # in half precision: they agree to a few half-precision ulps (bf16: 2^-8 relative).
    torch.testing.assert_close(got.double(), expected, rtol=0.05, atol=0.0)
