"""Gradients entering a layer's own graph below its output are refused (adversarial review, two blind spots).

The use check compared the gradient reaching each parameter's accumulator with what the hooked calls' edges
into it sent. Two paths joined the hooked graph above the accumulator, so that check could not see them:

1. Under ``torch.autocast`` a weight is cast once per autocast region and cached: ``lin(x)`` and an outside
   ``F.linear(h, lin.weight)`` share the cast, so both reach the accumulator through ONE edge. The meter gave
   B_simple 5.45 "resolved" with a zero-width interval where the exact per-example loop gives 21.8.
2. An input-gradient penalty (R1, WGAN-GP) backpropagated with the loss reaches the weights through the
   double-backward graph, which enters the layer's graph at the transposed weight ``addmm`` saved:
   |G|^2 -0.7564 and tr(Sigma) 22.732 where the exact loop gives -0.7716 and 22.884.

Both are now refused at the backward, naming the parameter. What must keep working: a layer called several
times under autocast (its calls share the cast), ties through modules under autocast, and penalties or probes
that never reach ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from noisescale import GradientNoiseScale
from noisescale.errors import UnsupportedLayerError
from noisescale.per_example import PerExampleNorms

N, D = 10, 6
F64 = torch.float64
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
# bfloat16 keeps 8 bits: the kernels (float32 from the bf16 activations) and the loop (bf16 weight
# gradients) round differently, by a few 1e-3 relative here; a use the kernels miss is off by far more.
AUTOCAST_RTOL = 2e-2


def exact_parts(model: nn.Module, loss_of: Callable[[slice], Tensor], n: int = N) -> tuple[float, float]:
    """Unbiased |G|^2 and tr(Sigma) of the n per-example gradients, in float64 (B_small 1, B_big n)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(n):
        grads = torch.autograd.grad(loss_of(slice(i, i + 1)), params)
        rows.append(torch.cat([g.reshape(-1).to(F64) for g in grads]))
    g = torch.stack(rows)
    mean = g.mean(0)
    grad_norm_sq = (n * mean.square().sum() - g.square().sum(1).mean()) / (n - 1)
    return float(grad_norm_sq), float((g - mean).square().sum() / (n - 1))


def metered(model: nn.Module, loss_of: Callable[[slice], Tensor]) -> tuple[float, float]:
    """|G|^2 and tr(Sigma) of one per_example step on the whole batch."""
    meter = GradientNoiseScale(model, method="per_example", ema_decay=1.0)
    try:
        loss_of(slice(None)).backward()
        meter.update()
        est = meter.compute()
    finally:
        meter.remove()
    assert est.grad_norm_sq is not None and est.trace_sigma is not None
    return est.grad_norm_sq, est.trace_sigma


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(D, D)


# -- 1. autocast ---------------------------------------------------------------------------------


@pytest.mark.parametrize("outside_first", [False, True], ids=["layer_first", "outside_first"])
def test_outside_use_sharing_autocasts_cast_is_refused(outside_first: bool) -> None:
    """The outside use goes through autocast's cached cast of the weight, which the layer's call also uses."""
    torch.manual_seed(0)
    x, y = torch.randn(N, D), torch.randn(N, D)
    model = Cell()
    meter = GradientNoiseScale(model, method="per_example")
    with torch.autocast(**BF16):
        if outside_first:
            out = model.lin(torch.tanh(F.linear(x, model.lin.weight)))
        else:
            out = F.linear(torch.tanh(model.lin(x)), model.lin.weight)
    loss = (out.float() - y).square().mean()
    with pytest.raises(UnsupportedLayerError, match=r"'lin\.weight' .*outside the layer") as info:
        loss.backward()
    assert "method='microbatch'" in str(info.value)
    meter.remove()


@pytest.mark.parametrize("uses", [1, 2, 3])
def test_layer_called_several_times_under_autocast_is_exact(uses: int) -> None:
    """All calls of the layer share the cast weight: its several hooked edges are summed, not refused."""
    torch.manual_seed(0)
    x, y = torch.randn(N, D), torch.randn(N, 1)
    model = Cell()

    def loss_of(rows: slice) -> Tensor:
        with torch.autocast(**BF16):
            h = x[rows]
            for _ in range(uses):
                h = torch.tanh(model.lin(h))
        return (h.float().sum(1, keepdim=True) - y[rows]).square().mean()

    got = metered(model, loss_of)
    grad_norm_sq, trace_sigma = exact_parts(model, loss_of)
    assert got[0] == pytest.approx(grad_norm_sq, rel=AUTOCAST_RTOL)
    assert got[1] == pytest.approx(trace_sigma, rel=AUTOCAST_RTOL)


def test_layer_called_twice_under_autocast_leaves_grad_as_autograd_gives_it() -> None:
    """The second call's gradient into the shared cast is held back and added by the cast node's pre-hook:
    .grad must be bit for bit what autograd alone accumulates."""
    torch.manual_seed(0)
    x = torch.randn(N, D)
    model, reference = Cell(), Cell()
    pe = PerExampleNorms(model, [list(model.parameters())])
    for m in (model, reference):
        with torch.autocast(**BF16):
            out = m.lin(torch.tanh(m.lin(x)))
        out.float().square().mean().backward()
    assert pe.pop() is not None
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    pe.remove()


class TiedLM(nn.Module):
    """Embedding, a body, and a head tied to the embedding through a module."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, D)
        self.body = nn.Linear(D, D)
        self.head = nn.Linear(D, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(self.emb(tokens))))


def test_module_tie_under_autocast_is_exact() -> None:
    """The head casts the shared weight (the embedding does not): two hooked edges into one accumulator."""
    model = TiedLM()
    tokens = torch.randint(11, (N, 5), generator=torch.Generator().manual_seed(3))

    def loss_of(rows: slice) -> Tensor:
        with torch.autocast(**BF16):
            logits = model(tokens[rows, :-1])
        return F.cross_entropy(logits.float().reshape(-1, 11), tokens[rows, 1:].reshape(-1))

    got = metered(model, loss_of)
    grad_norm_sq, trace_sigma = exact_parts(model, loss_of)
    assert got[0] == pytest.approx(grad_norm_sq, rel=AUTOCAST_RTOL)
    assert got[1] == pytest.approx(trace_sigma, rel=AUTOCAST_RTOL)


# -- 2. input-gradient penalties -------------------------------------------------------------------


def critic(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "conv":
        return nn.Sequential(nn.Conv1d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * (D - 2), 1)).to(F64)
    return nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 1)).to(F64)


def batch(kind: str) -> Tensor:
    x = torch.randn(N, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    return x.unsqueeze(1) if kind == "conv" else x


@pytest.mark.parametrize("penalty", ["r1", "wgan_gp"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_input_gradient_penalty_backpropagated_with_the_loss_is_refused(kind: str, penalty: str) -> None:
    """The refusal comes at the backward that adds into .grad, names a parameter and says what to use."""
    model = critic(kind)
    x = batch(kind)
    meter = GradientNoiseScale(model, method="per_example")
    if penalty == "r1":
        x.requires_grad_(True)
        out = model(x)
        loss = -out.mean()
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        term = gx.flatten(1).square().sum(1).mean()
    else:  # WGAN-GP: the gradient at random interpolates of real and fake
        fake = torch.randn_like(x)
        eps = torch.rand(N, *([1] * (x.dim() - 1)), dtype=F64, generator=torch.Generator().manual_seed(1))
        mixed = (eps * x + (1 - eps) * fake).requires_grad_(True)
        loss = model(fake).mean() - model(x).mean()
        (gx,) = torch.autograd.grad(model(mixed).sum(), mixed, create_graph=True)
        term = (gx.flatten(1).norm(dim=1) - 1).square().mean()
    with pytest.raises(UnsupportedLayerError, match=r"parameters? '\d\.weight'.*create_graph=True") as info:
        (loss + 10 * term).backward()
    assert "method='microbatch'" in str(info.value)
    meter.remove()


def test_penalty_graph_left_out_of_the_loss_is_exact() -> None:
    """An input gradient computed with create_graph=True (to log its norm) but not backpropagated: no refusal,
    and the loss's norms are exact."""
    model = critic("linear")
    x, y = batch("linear"), torch.randn(N, 1, dtype=F64, generator=torch.Generator().manual_seed(2))

    def loss_of(rows: slice) -> Tensor:
        xr = x[rows].clone().requires_grad_(True)
        out = model(xr)
        (gx,) = torch.autograd.grad(out.sum(), xr, create_graph=True)
        assert gx.requires_grad  # a double-backward graph through both layers exists
        return (out - y[rows]).square().mean()

    got = metered(model, loss_of)
    grad_norm_sq, trace_sigma = exact_parts(model, loss_of)
    assert got[0] == pytest.approx(grad_norm_sq, rel=1e-9)
    assert got[1] == pytest.approx(trace_sigma, rel=1e-9)


def test_second_order_probe_with_autograd_grad_is_neither_measured_nor_refused() -> None:
    """A penalty's gradient taken with torch.autograd.grad (never reaching .grad): nothing to check."""
    model = critic("linear")
    params = list(model.parameters())
    pe = PerExampleNorms(model, [params])
    x = batch("linear").requires_grad_(True)
    (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    grads = torch.autograd.grad(gx.square().sum(), params, allow_unused=True)  # the last bias: unused
    assert grads[0] is not None
    assert pe.pop() is None
    assert all(p.grad is None for p in params)
    pe.remove()
