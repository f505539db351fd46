"""Brute-force references for the per-example kernels, as fixtures (BackPACK's autograd loop).

Both work in whatever dtype the graph has (the tests use float64) and return ``[N, G]``
squared norms of each example's contribution to each group's gradient; given ``weights`` (a
diagonal preconditioner ``{param: P}``), the weighted ones ``sum_j P_j c_nj^2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

Groups = Sequence[Sequence[nn.Parameter]]


Weights = dict[Tensor, Tensor] | None


def _norms(
    contributions: dict[int, Tensor], groups: Groups, n: int, like: Tensor, weights: Weights
) -> Tensor:
    out = like.new_zeros(n, len(groups))
    by_id = {} if weights is None else {id(p): w for p, w in weights.items()}
    for j, group in enumerate(groups):
        for p in group:
            if id(p) in contributions:
                sq = contributions[id(p)].square()
                out[:, j] += (sq * by_id[id(p)] if weights is not None else sq).flatten(1).sum(1)
    return out


def random_weights(groups: Groups, seed: int = 0) -> dict[Tensor, Tensor]:
    """A fixed diagonal preconditioner: weights in [0.1, 1.1) for every trainable parameter of ``groups``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        p: 0.1 + torch.rand(p.shape, generator=gen, dtype=p.dtype)
        for g in groups
        for p in g
        if p.requires_grad
    }


def per_example_loss_reference(
    losses: Tensor, groups: Groups, *, reduction: str = "mean", weights: Weights = None
) -> Tensor:
    """Per-example gradients by one ``autograd.grad`` per example loss, on the batch graph.

    Valid when examples do not interact (no BatchNorm in train mode): example n's
    contribution to the gradient of ``losses.mean()`` is ``grad(losses[n]) / N``.

    Args:
        losses: ``[N]`` per-example losses (reduction='none'), graph retained.
        groups: parameter groups; frozen parameters are skipped.
        reduction: "mean" (divide by N) or "sum".
        weights: a diagonal preconditioner ``{param: P}``: the weighted norms instead.

    Returns:
        ``[N, G]``.
    """
    n = losses.shape[0]
    scale = 1.0 / n if reduction == "mean" else 1.0
    params = [p for g in groups for p in g if p.requires_grad]
    rows = [torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True) for i in range(n)]
    contributions = {
        id(p): torch.stack([torch.zeros_like(p) if r[k] is None else r[k] * scale for r in rows])
        for k, p in enumerate(params)
    }
    return _norms(contributions, groups, n, losses, weights)


def contribution_reference(
    loss: Tensor,
    uses: Sequence[tuple[Tensor, Sequence[nn.Parameter]]],
    groups: Groups,
    weights: Weights = None,
) -> Tensor:
    """Per-example contributions by masking each layer output's gradient to one example.

    For every layer use (its output tensor and the parameters it applies), example n's
    contribution is the vector-Jacobian product of that output with the gradient of
    ``loss`` w.r.t. it, restricted to row n; uses of one parameter are summed. This is
    the definition the kernels implement, valid with BatchNorm too.

    Args:
        loss: the scalar batch loss, graph retained.
        uses: ``(output, params)`` for each layer call.
        groups: parameter groups.
        weights: a diagonal preconditioner ``{param: P}``: the weighted norms instead.

    Returns:
        ``[N, G]``.
    """
    outputs = [out for out, _ in uses]
    grads_out = torch.autograd.grad(loss, outputs, retain_graph=True)
    n = outputs[0].shape[0]
    contributions: dict[int, Tensor] = {}
    for (out, params), go in zip(uses, grads_out, strict=True):
        for i in range(n):
            masked = torch.zeros_like(go)
            masked[i] = go[i]
            for p, g in zip(params, torch.autograd.grad(out, params, masked, retain_graph=True), strict=True):
                per = contributions.setdefault(id(p), torch.zeros(n, *p.shape, dtype=p.dtype))
                per[i] += g
    return _norms(contributions, groups, n, loss, weights)


# float64 round-off: every entry is a sum of at most a few hundred products of O(1) numbers,
# squared, so both sides agree to ~1e-14 relative; 1e-10 leaves a wide margin (and is far
# stricter than the 1e-5 asked of the library) while one missing or extra term changes an
# entry by ~1e-2 relative or more.
RTOL = 1e-10


def assert_norms_match(got: Tensor | None, expected: Tensor) -> None:
    """Per group, ``max_n |got - expected| <= RTOL * max_n |expected|`` (zero groups exactly zero)."""
    assert got is not None, "no hook fired"
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert got.dtype == expected.dtype
    scale = expected.abs().amax(0)
    err = (got - expected).abs().amax(0)
    assert torch.all(err <= RTOL * scale), f"relative error per group {(err / scale).tolist()}"


@pytest.fixture
def per_example_reference() -> Callable[..., Tensor]:
    return per_example_loss_reference


@pytest.fixture
def masked_reference() -> Callable[..., Tensor]:
    return contribution_reference


@pytest.fixture
def check_norms() -> Callable[[Tensor | None, Tensor], None]:
    return assert_norms_match
