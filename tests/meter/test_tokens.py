"""Language-model batches in tokens: masks and unequal token counts, both methods, against brute force.

A step's micro-batches (``microbatch``) or sequences (``per_example`` with ``example_sizes``)
carry different numbers of loss tokens. The reference computes, in float64 with autograd, each
small batch's exact mean-token gradient ``g_i`` over its ``n_i`` unmasked tokens and the step's
gradient, and applies the k-way estimator by hand (McCandlish et al. 2018, eqs. A.1, A.2, one
pair per small batch against the big one): with weights ``u_i`` of the ``g_i`` in the big
gradient, the big batch is worth ``b = 1 / sum u_i^2 / n_i`` tokens and

    |G|^2 = mean_i (|G_big|^2 / n_i - |g_i|^2 / b) / (1/n_i - 1/b)
    tr Sigma = mean_i (|g_i|^2 - |G_big|^2) / (1/n_i - 1/b).

Every number is a deterministic function of the same float64 gradients, so the meter must
match to rounding (rtol 1e-9: sums of a few hundred float64 products).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisescale import GradientNoiseScale, SingleMicrobatchError

V, D, T = 7, 4, 6  # vocabulary, width, positions
RTOL = 1e-9


class TinyLM(nn.Module):
    """Per-token model with every kernel the shakespeare model uses: embedding, linear, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, dtype=torch.float64)
        self.mid = nn.Linear(D, D, dtype=torch.float64)
        self.norm = nn.LayerNorm(D, dtype=torch.float64)
        self.head = nn.Linear(D, V, dtype=torch.float64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.mid(self.emb(ids)))))  # [B, T, V]


def token_losses(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` cross-entropy of every token."""
    logits = model(ids)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(
        ids.shape
    )


def batch(seed: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random sequences with a padding mask: each row keeps a random prefix (one row fully masked)."""
    gen = torch.Generator().manual_seed(seed)
    ids, targets = torch.randint(V, (rows, T), generator=gen), torch.randint(V, (rows, T), generator=gen)
    lengths = torch.randint(1, T + 1, (rows,), generator=gen)
    lengths[rows // 2] = 0  # a sequence with no loss token (all padding)
    mask = torch.arange(T)[None] < lengths[:, None]  # [B, T]
    return ids, targets, mask


def flat_grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def k_way(
    small: list[torch.Tensor], sizes: list[int], weights: list[float], big: torch.Tensor
) -> tuple[float, float]:
    """The reference: |G|^2 and tr(Sigma) per token from exact small-batch and big gradients."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    n = torch.tensor(sizes, dtype=torch.float64)
    v_big = float((w.square() / n).sum())
    big_sq = float(big.square().sum())
    g2, tr = [], []
    for g, size in zip(small, sizes, strict=True):
        v = 1.0 / size
        g2.append((v * big_sq - v_big * float(g.square().sum())) / (v - v_big))
        tr.append((float(g.square().sum()) - big_sq) / (v - v_big))
    return sum(g2) / len(g2), sum(tr) / len(tr)


def mean_over(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (losses * mask).sum() / mask.sum()


@pytest.mark.parametrize("accumulation", ["example_mean", "mean"])
def test_microbatch_weights_by_token_counts(accumulation: str) -> None:
    """Micro-batches of 2 sequences each with different token counts, over 3 steps (plain mean)."""
    model = TinyLM()
    meter = GradientNoiseScale(model, method="microbatch", accumulation=accumulation, ema_decay=1.0)
    expected = []
    for step in range(3):
        ids, targets, mask = batch(step)
        parts = [(ids[i : i + 2], targets[i : i + 2], mask[i : i + 2]) for i in range(0, 8, 2)]
        parts = [p for p in parts if p[2].any()]  # a micro-batch of padding alone is no micro-batch
        sizes = [int(m.sum()) for _, _, m in parts]
        total, k = sum(sizes), len(parts)
        small = []
        for x, y, m in parts:
            small.append(
                flat_grad(model, mean_over(token_losses(model, x, y), m))
            )  # g_i: mean over its tokens
            losses = token_losses(model, x, y)
            # example_mean: the sum of its token losses over the step's tokens; mean: its mean / k.
            step_loss = (
                (losses * m).sum() / total if accumulation == "example_mean" else mean_over(losses, m) / k
            )
            step_loss.backward()
        meter.update(microbatch_sizes=sizes)
        weights = sizes if accumulation == "example_mean" else [1.0] * k
        big = sum(w * g for w, g in zip(weights, small, strict=True)) / sum(weights)
        torch.testing.assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), big)
        expected.append(k_way(small, sizes, weights, big))
        model.zero_grad()
    est = meter.compute()
    assert est.grad_norm_sq == pytest.approx(sum(e[0] for e in expected) / 3, rel=RTOL)
    assert est.trace_sigma == pytest.approx(sum(e[1] for e in expected) / 3, rel=RTOL)
    assert est.examples == sum(int(batch(s)[2].sum()) for s in range(3))  # tokens, not sequences


@pytest.mark.parametrize("passes", [1, 2], ids=["one-backward", "two-backward"])
def test_per_example_weights_each_sequence_by_its_tokens(passes: int) -> None:
    """Each sequence is a small batch of its unmasked tokens; the fully masked one carries none."""
    model = TinyLM()
    meter = GradientNoiseScale(
        model, method="per_example", ema_decay=1.0
    )  # mean over a pass's tokens, / passes
    ids, targets, mask = batch(7)
    halves = [(ids[i::passes], targets[i::passes], mask[i::passes]) for i in range(passes)]
    small, sizes, weights = [], [], []
    for x, y, m in halves:
        losses = token_losses(model, x, y)
        (mean_over(losses, m) / passes).backward()
        for s in range(len(x)):
            if m[s].any():  # sequence s: weight w_s / (passes N_i) of its own mean-token gradient
                small.append(
                    flat_grad(model, mean_over(token_losses(model, x[s : s + 1], y[s : s + 1]), m[s : s + 1]))
                )
                sizes.append(int(m[s].sum()))
                weights.append(int(m[s].sum()) / (passes * int(m.sum())))
    big = torch.cat([p.grad.flatten() for p in model.parameters()])
    meter.update(example_sizes=torch.cat([m.sum(1) for _, _, m in halves]).tolist())
    est = meter.compute()
    g2, tr = k_way(small, sizes, weights, big)
    assert est.grad_norm_sq == pytest.approx(g2, rel=RTOL)
    assert est.trace_sigma == pytest.approx(tr, rel=RTOL)
    assert est.examples == int(mask.sum())


@pytest.mark.parametrize("preconditioned", [False, True], ids=["raw", "preconditioned"])
def test_fixed_length_windows_give_tokens_the_same_way_for_both_methods(preconditioned: bool) -> None:
    """B windows of T tokens, loss the mean over all B T tokens: ``per_example(example_sizes=T)`` equals
    ``microbatch`` with one window per micro-batch (sizes T), and T times the per-window estimate; so
    does the preconditioned estimate (a fixed diagonal P: the same rows on P-weighted norms)."""
    ids, targets, _ = batch(3)
    results = {}
    for name, method in (("tokens", "per_example"), ("windows", "per_example"), ("microbatch", "microbatch")):
        model = TinyLM()
        weights = {
            p: torch.rand(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype)
            for p in model.parameters()
        }
        meter = GradientNoiseScale(
            model, method=method, ema_decay=1.0, preconditioner=weights if preconditioned else None
        )
        if method == "microbatch":
            for s in range(len(ids)):
                (token_losses(model, ids[s : s + 1], targets[s : s + 1]).mean() / len(ids)).backward()
            meter.update(microbatch_sizes=[T] * len(ids))
        else:
            token_losses(model, ids, targets).mean().backward()
            meter.update(example_sizes=T if name == "tokens" else None)
        estimate = meter.compute()
        results[name] = estimate.preconditioned if preconditioned else estimate
    tokens, windows, micro = results["tokens"], results["windows"], results["microbatch"]
    assert tokens is not None and windows is not None and micro is not None
    assert tokens.examples == micro.examples == len(ids) * T and windows.examples == len(ids)
    for key in ("grad_norm_sq", "trace_sigma", "b_simple"):
        if getattr(micro, key) is not None:
            assert getattr(tokens, key) == pytest.approx(getattr(micro, key), rel=RTOL), key
    assert tokens.grad_norm_sq == pytest.approx(windows.grad_norm_sq, rel=RTOL)
    assert tokens.trace_sigma == pytest.approx(T * windows.trace_sigma, rel=RTOL)


def test_bad_example_sizes_say_what_to_give() -> None:
    model = TinyLM()
    ids, targets, _ = batch(1)
    per_example = GradientNoiseScale(model, method="per_example")
    for sizes, message in (
        ([T] * 3, "got 3 example_sizes for the 8 examples"),
        ([-1] * 8, "integers >= 0 .* but got -1"),
        ([T + 0.5] * 8, "integers >= 0 .* but got 6.5"),  # truncated to T before: a wrong count
        ([float("nan")] * 8, "integers >= 0 .* but got nan"),
        ("66666666", "integers >= 0 .* but got '66666666'"),  # iterated as characters before
    ):
        token_losses(model, ids, targets).mean().backward()
        with pytest.raises(ValueError, match=message):
            per_example.update(example_sizes=sizes)
        model.zero_grad()
    token_losses(model, ids, targets).mean().backward()
    with pytest.raises(ValueError, match="batch_size=5 but example_sizes sum to 48"):
        per_example.update(5, example_sizes=T)
    model.zero_grad()
    token_losses(model, ids, targets).mean().backward()
    with pytest.raises(SingleMicrobatchError, match=r"1 example.* carry loss units .* needs 2"):  # no spread
        per_example.update(example_sizes=[T] + [0] * 7)
    per_example.remove()
    model.zero_grad()
    micro = GradientNoiseScale(model, method="microbatch")
    for half in (slice(0, 4), slice(4, 8)):
        (token_losses(model, ids[half], targets[half]).mean() / 2).backward()
    with pytest.raises(ValueError, match="example_sizes is for method='per_example'"):
        micro.update(microbatch_sizes=[4 * T, 4 * T], example_sizes=T)
