"""The recompute fallback: BatchNorm, MultiheadAttention, custom layers with their own parameters."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from noisescale.per_example import PerExampleNorms
from noisescale.per_example import fallback as fb
from noisescale.preconditioner import Preconditioner
from tests.per_example.conftest import random_weights

F64 = torch.float64
N = 4


def pel(out: Tensor) -> Tensor:
    return 0.5 * (out - 0.3).square().flatten(1).sum(1) + out.sin().flatten(1).sum(1)


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(2, 3, 3),
            bn=nn.BatchNorm2d(3),
            act=nn.Tanh(),
            flat=nn.Flatten(),
            head=nn.Linear(3 * 3 * 3, 2),
        )
    ).to(F64)


@pytest.mark.parametrize("precondition", [False, True], ids=["plain", "preconditioned"])
def test_batchnorm_matches_masked_contributions(
    precondition: bool, masked_reference: Callable, check_norms: Callable
) -> None:
    """In train mode examples interact through the batch statistics; the fallback gives the
    decomposition of the batch gradient by output row (statistics held fixed), like every kernel;
    under a preconditioner its weighted norms follow."""
    model = bn_model()
    outputs: dict[str, Tensor] = {}
    for name in ("conv", "bn", "head"):
        model.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: outputs.__setitem__(name, o)
        )
    groups = [list(model.conv.parameters()), list(model.bn.parameters()), list(model.head.parameters())]
    weights = random_weights(groups) if precondition else None
    pre = None if weights is None else Preconditioner(list(weights), weights)
    pe = PerExampleNorms(model, groups, fallback=True, preconditioner=pre)
    loss = pel(model(torch.randn(N, 2, 5, 5, dtype=F64))).mean()
    loss.backward(retain_graph=True)
    got = pe.pop()
    pe.remove()
    uses = [(outputs[name], list(model.get_submodule(name).parameters())) for name in ("conv", "bn", "head")]
    expected = masked_reference(loss, uses, groups)
    if weights is not None:
        expected = torch.cat([expected, masked_reference(loss, uses, groups, weights=weights)], 1)
    check_norms(got, expected)


def test_batchnorm_contributions_sum_to_the_true_gradient() -> None:
    """Sum over examples of the fallback's contributions == the batch gradient; buffers untouched."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).to(F64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x, go = torch.randn(N, 3, 4, 4, dtype=F64), torch.randn(N, 3, 4, 4, dtype=F64)
    call = fb.SavedCall((x,), {}, fb.capture_rng((x,), {}), (0,), ("weight", "bias"))
    running = copy.deepcopy(dict(bn.named_buffers()))
    grads = fb.per_example_grads(bn, call, [go], ("weight", "bias"))
    for name, buf in bn.named_buffers():
        assert torch.equal(buf, running[name]), f"{name} changed by the recompute"
    true = torch.autograd.grad(bn(x), [bn.weight, bn.bias], go)
    # float64 round-off of a sum of N terms.
    torch.testing.assert_close(grads["weight"].sum(0), true[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["bias"].sum(0), true[1], rtol=1e-12, atol=1e-12)
    # With the statistics fixed, example n's weight contribution is sum_hw go_n * x_hat_n.
    x_hat = nn.functional.batch_norm(x, None, None, training=True, eps=bn.eps)
    torch.testing.assert_close(grads["weight"], (go * x_hat).sum((2, 3)), rtol=1e-12, atol=1e-12)
    norms = fb.per_example_norms(bn, call, [go], ("weight", "bias"))
    torch.testing.assert_close(norms["weight"], grads["weight"].square().sum(1), rtol=1e-12, atol=1e-12)


def test_fallback_leaves_the_training_step_alone() -> None:
    """Running statistics and .grad match a model without hooks, and a multi-grad hook on the
    parameters (how the meter calls pop()) fires once per backward: the recompute differentiates
    detached copies, never the real parameters."""
    hooked, plain = bn_model(), bn_model()
    pe = PerExampleNorms(hooked, [list(hooked.parameters())], fallback=True)
    popped: list[Tensor | None] = []
    torch.autograd.graph.register_multi_grad_hook(
        list(hooked.parameters()), lambda grads: popped.append(pe.pop())
    )
    x = torch.randn(N, 2, 5, 5, dtype=F64)
    for model in (hooked, plain):
        pel(model(x)).mean().backward()
    assert len(popped) == 1
    assert popped[0] is not None
    assert popped[0].shape == (N, 1)
    for name, buf in plain.named_buffers():
        assert torch.equal(hooked.get_buffer(name), buf), name
    for (name, p), q in zip(hooked.named_parameters(), plain.parameters(), strict=True):
        assert p.grad is not None
        assert torch.equal(p.grad, q.grad), name


class ScaledDropout(nn.Module):
    """A custom layer with its own parameter, randomness inside, and a child it calls."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.drop(x * self.scale))


def custom_layer() -> tuple[nn.Module, Tensor]:
    return nn.Sequential(nn.Linear(4, 4), ScaledDropout(4), nn.Tanh(), nn.Linear(4, 2)).to(F64), torch.randn(
        N, 3, 4, dtype=F64
    )


def attention() -> tuple[nn.Module, Tensor]:
    # MultiheadAttention owns in_proj_* and uses out_proj's parameters without calling it.
    return nn.Sequential(
        nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.2, batch_first=True)
    ).to(F64), torch.randn(N, 3, 4, dtype=F64)


@pytest.mark.parametrize("precondition", [False, True], ids=["plain", "preconditioned"])
@pytest.mark.parametrize(
    "build", [custom_layer, attention], ids=["custom-param-dropout", "transformer-encoder"]
)
def test_fallback_layers_match_per_example_autograd(
    build: Callable[[], tuple[nn.Module, Tensor]],
    precondition: bool,
    per_example_reference: Callable,
    check_norms: Callable,
) -> None:
    """Examples are independent here, so the per-example-loss loop is the reference; the random
    masks of the first forward are replayed by the recompute (and give the weighted norms too)."""
    torch.manual_seed(0)
    model, x = build()
    groups = [[p] for p in model.parameters()]
    weights = random_weights(groups) if precondition else None
    pre = None if weights is None else Preconditioner(list(weights), weights)
    pe = PerExampleNorms(model, groups, fallback=True, preconditioner=pre)
    losses = pel(model(x))
    losses.mean().backward(retain_graph=True)
    got = pe.pop()
    pe.remove()
    expected = per_example_reference(losses, groups)
    assert bool((expected > 0).all())
    if weights is not None:
        expected = torch.cat([expected, per_example_reference(losses, groups, weights=weights)], 1)
    check_norms(got, expected)


def test_fallback_covers_unsupported_conv3d(per_example_reference: Callable, check_norms: Callable) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 3, 2), nn.Flatten(), nn.Linear(3 * 8, 2)).to(F64)
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    pe = PerExampleNorms(model, groups, fallback=True)
    losses = pel(model(torch.randn(N, 2, 3, 3, 3, dtype=F64)))
    losses.mean().backward(retain_graph=True)
    got = pe.pop()
    pe.remove()
    check_norms(got, per_example_reference(losses, groups))
