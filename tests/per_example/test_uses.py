"""A parameter used outside the layer that owns it is refused, naming it (issue 13 #1).

The per-example kernels see a parameter only through its layer's calls; a second use
elsewhere (a tied head written ``h @ emb.weight.T``) made |G|^2 and tr(Sigma) silently
wrong. Ties through modules (``head.weight = emb.weight``) must stay exact.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from noisescale.errors import UnsupportedLayerError
from noisescale.meter import GradientNoiseScale
from noisescale.per_example import PerExampleNorms

F64 = torch.float64
V, D, T, N = 11, 8, 6, 5


class TinyLM(nn.Module):
    """Embedding, one Linear, and a head tied to the embedding: through a module, or by a matmul."""

    def __init__(self, head: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.body = nn.Linear(D, D)
        self.head_kind = head
        if head == "module":
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.body(self.emb(tokens)))  # [N, T, D]
        if self.head_kind == "module":
            return self.head(h)
        return h @ self.emb.weight.T  # the bypass of the issue


def lm_losses(model: nn.Module, tokens: Tensor) -> Tensor:
    """``[N]`` per-sequence mean next-token cross-entropies."""
    logits = model(tokens[:, :-1])
    return (
        nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
        .view(tokens.shape[0], -1)
        .mean(1)
    )


def tokens(seed: int, n: int = N) -> Tensor:
    return torch.randint(V, (n, T), generator=torch.Generator().manual_seed(seed))


def test_tied_head_written_as_a_matmul_is_refused_naming_the_parameter() -> None:
    """Today's code gave a number (B_simple 6.83 where the exact loop gives 7.22 on this model)."""
    model = TinyLM("matmul").to(F64)
    pe = PerExampleNorms(model, [list(model.parameters())])
    loss = lm_losses(model, tokens(1)).mean()
    with pytest.raises(UnsupportedLayerError, match=r"'emb\.weight' .*outside the layer") as info:
        loss.backward()
    assert "head.weight = emb.weight" in str(info.value)
    assert "method='microbatch'" in str(info.value)
    pe.remove()


def test_layer_called_twice_plus_an_outside_use_is_refused() -> None:
    """Two hooked uses (the materialising path) and one outside use: still refused."""
    model = nn.Linear(4, 4).to(F64)
    pe = PerExampleNorms(model, [list(model.parameters())])
    x = torch.randn(N, 4, dtype=F64)
    loss = model(model(x)).square().sum() + (x @ model.weight.T).sum()
    with pytest.raises(UnsupportedLayerError, match=r"'weight'"):
        loss.backward()
    pe.remove()


def test_outside_use_in_autograd_grad_is_not_checked() -> None:
    """torch.autograd.grad never reaches .grad: nothing is measured there, nothing refused."""
    model = TinyLM("matmul").to(F64)
    pe = PerExampleNorms(model, [list(model.parameters())])
    grads = torch.autograd.grad(lm_losses(model, tokens(2)).mean(), list(model.parameters()))
    assert all(g is not None for g in grads)
    assert pe.pop() is None
    pe.remove()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
def test_module_tie_stays_exact(
    create_graph: bool, per_example_reference: Callable, check_norms: Callable
) -> None:
    """The checker holds back the second hooked use's gradient and adds it in the tensor hook:
    .grad must be exactly what autograd alone gives, and the norms exact."""
    model = TinyLM("module").to(F64)
    reference = TinyLM("module").to(F64)
    reference.load_state_dict(model.state_dict())
    groups = [[model.emb.weight], [model.body.weight, model.body.bias]]
    pe = PerExampleNorms(model, groups)
    losses = lm_losses(model, tokens(3))
    losses.mean().backward(retain_graph=True, create_graph=create_graph)
    got = pe.pop()
    lm_losses(reference, tokens(3)).mean().backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0.0)
    model.zero_grad(set_to_none=True)
    check_norms(got, per_example_reference(losses, groups))
    pe.remove()


def exact_b_simple(model: nn.Module, batches: list[Tensor]) -> tuple[float, float]:
    """Unbiased per-step (|G|^2, tr Sigma) averaged over steps, from an explicit per-example loop."""
    params = list(model.parameters())
    g_sum = s_sum = 0.0
    for batch in batches:
        rows = []
        for n in range(batch.shape[0]):
            grads = torch.autograd.grad(lm_losses(model, batch[n : n + 1]).sum(), params)
            rows.append(torch.cat([g.flatten() for g in grads]))
        g = torch.stack(rows)
        b = g.shape[0]
        mean_sq, big = g.square().sum(1).mean(), g.mean(0).square().sum()
        g_sum += float((b * big - mean_sq) / (b - 1))
        s_sum += float(b / (b - 1) * (mean_sq - big))
    return g_sum / len(batches), s_sum / len(batches)


def test_meter_with_a_module_tie_matches_the_exact_per_example_loop() -> None:
    """Same steps, same parameters (lr 0), deterministic: equal to float64 round-off (1e-9)."""
    model = TinyLM("module").to(F64)
    meter = GradientNoiseScale(model, method="per_example", ema_decay=1.0)
    batches = [tokens(10 + i, 16) for i in range(6)]
    for batch in batches:
        lm_losses(model, batch).mean().backward()
        meter.update()
        model.zero_grad()
    est = meter.compute()
    grad_norm_sq, trace_sigma = exact_b_simple(model, batches)
    assert est.grad_norm_sq == pytest.approx(grad_norm_sq, rel=1e-9)
    assert est.trace_sigma == pytest.approx(trace_sigma, rel=1e-9)


def test_meter_refuses_the_matmul_tie() -> None:
    model = TinyLM("matmul").to(F64)
    GradientNoiseScale(model, method="per_example")
    with pytest.raises(UnsupportedLayerError, match=r"'emb\.weight'"):
        lm_losses(model, tokens(4)).mean().backward()
