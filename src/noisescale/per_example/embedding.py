r"""Per-example gradient norms of ``nn.Embedding`` (weight ``[V, D]``).

Example ``n``'s contribution adds ``go_nt`` into row ``idx_nt`` for each position
``t``, so its squared norm is

.. math::

    \sum_{t,s} [idx_t = idx_s] (go_t \cdot go_s) = \sum_t go_t \cdot S_{idx_t},

with ``S_v`` the sum of ``go_t`` over the example's positions holding index ``v``,
that is ``sum_v |S_v|^2``. Instead of the ``[N, T, T]`` masked Gram matrix (Li et al.
2022) the kernel adds each position's row into its ``S`` row with one ``index_add_``
and takes the norms of the ``[N, R, D]`` sums: with ``R = V`` rows per example (the
dense route, when ``V <= T``) or, for larger vocabularies, with ``R = T`` rows, one
per run of equal indices after sorting each example's indices. ``O(N T D)`` work
and memory either way, no host synchronisation, exact. Positions holding
``padding_idx`` get no gradient; ``scale_grad_by_freq`` divides each position by
its index's count in the whole mini-batch, as PyTorch's backward does.

Under a diagonal preconditioner ``P`` (``[V, D]``) the weighted norm is
``sum_v sum_d P_vd S_vd^2``: the same sums, each row weighted by its index's row of ``P``.

Shape letters: ``N`` examples, ``T`` positions per example, ``D`` embedding size,
``V`` vocabulary size.

References:
    Li et al. (2022), Large Language Models Can Be Strong Differentially Private
    Learners, arXiv:2110.05679, appendix (embedding ghost norm).
    Gray et al. (2023), Efficient and Approximate Per-Example Gradient Norms for
    Gradient Noise Scale, WANT@NeurIPS.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from noisescale.per_example.kernel import Kernel, Norms, accumulation_dtype

__all__ = ["KERNEL", "embedding_grads", "embedding_norms", "embedding_pairs", "use_dense"]


def _prepare(module: nn.Embedding, idx: Tensor, go: Tensor) -> tuple[Tensor, Tensor]:
    """Indices ``[N, T]`` and the gradient rows each position adds ``[N, T, D]``."""
    n = idx.shape[0]
    idx = idx.reshape(n, -1)
    go = go.reshape(n, idx.shape[1], -1)
    go = go.to(accumulation_dtype(go.dtype))
    if module.padding_idx is not None:
        go = go.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0.0)
    if module.scale_grad_by_freq:
        flat = idx.reshape(-1)
        counts = go.new_zeros(module.num_embeddings).index_add_(0, flat, go.new_ones(flat.shape))
        go = go / counts[idx].unsqueeze(-1)
    return idx, go


def _keys(module: nn.Embedding, idx: Tensor) -> Tensor:
    """Row of each position in the stacked ``[N V, D]`` per-example gradients, ``[N T]``."""
    offsets = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * module.num_embeddings
    return (idx + offsets).reshape(-1)


def use_dense(v: int, t: int) -> bool:
    """Whether to sum into one row per vocabulary entry (``V <= T``) rather than per run of indices.

    Args:
        v: vocabulary size.
        t: positions per example.

    Returns:
        True for ``V`` rows per example (no sort), False for ``T`` (sorted runs).
    """
    return v <= t


def _sum_rows(module: nn.Embedding, idx: Tensor) -> tuple[Tensor, int]:
    """Row of each position among ``N R`` rows of sums (``[N T]``), and ``R``.

    Example ``n`` owns rows ``[n R, (n + 1) R)``; equal indices of one example share a row.
    """
    n, t = idx.shape
    keys = _keys(module, idx)
    if use_dense(module.num_embeddings, t):
        return keys, module.num_embeddings
    sorted_keys, order = keys.sort()  # example n owns sorted slots [n T, (n + 1) T)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]  # True at each example's first slot too
    run = starts.cumsum(0).view(n, t)
    local = run - run[:, :1]  # run index within the example, in [0, T)
    slot = (local + torch.arange(n, device=idx.device).unsqueeze(1) * t).view(-1)
    return torch.empty_like(slot).scatter_(0, order, slot), t


def _sums(module: nn.Module, x: Tensor, go: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Example ``n``'s rows ``S_v`` ``[N, R, D]``, the indices ``[N, T]``, and the row of each position.

    The row of each position (``[N T]`` into the ``N R`` rows) is None when ``T = 1`` (then
    ``R = 1``: the row is the position).
    """
    emb = cast(nn.Embedding, module)  # typing only, no check (see register_kernel)
    idx, go = _prepare(emb, x, go)
    n, t = idx.shape
    if t == 1:
        return go, idx, None
    rows, r = _sum_rows(emb, idx)
    d = go.shape[-1]
    # Summed as [D, N R] along dim 1: the same additions in the same order as along dim 0 of
    # [N R, D], but one strided add per index rather than a dispatched row add (several times
    # faster on CPU threads that sleep between parallel regions).
    sums = go.new_zeros(d, n * r).index_add_(1, rows, go.reshape(-1, d).T).T.contiguous()  # [N R, D]
    return sums.view(n, r, d), idx, rows


def embedding_norms(module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-example squared gradient norms of an Embedding layer.

    Args:
        module: the ``nn.Embedding``.
        x: integer indices ``[N]`` or ``[N, *]``.
        go: gradient w.r.t. its output ``[N, *, D]``.
        names: ``("weight",)`` or empty.

    Returns:
        ``{"weight": [N]}`` if asked.
    """
    if "weight" not in names:
        return {}
    sums, _, _ = _sums(module, x, go)
    return {"weight": torch.linalg.vector_norm(sums.flatten(1), dim=1).square()}


def embedding_pairs(
    module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...], weights: dict[str, Tensor]
) -> tuple[Norms, Norms]:
    """Plain and preconditioned per-example squared gradient norms of an Embedding layer.

    Args:
        module: the ``nn.Embedding``.
        x: integer indices ``[N]`` or ``[N, *]``.
        go: gradient w.r.t. its output ``[N, *, D]``.
        names: ``("weight",)`` or empty.
        weights: ``{"weight": [V, D]}`` the diagonal preconditioner.

    Returns:
        ``({"weight": [N]}, {"weight": [N]})`` if asked.
    """
    if "weight" not in names:
        return {}, {}
    sums, idx, rows = _sums(module, x, go)
    n, r = sums.shape[:2]
    # The index of each row (rows no position added to are zero: any index will do).
    index = idx if rows is None else idx.new_zeros(n * r).scatter_(0, rows, idx.reshape(-1)).view(n, r)
    sq = sums.square()  # [N, R, D]
    weight = weights["weight"].to(sq.dtype)
    return {"weight": sq.sum((1, 2))}, {"weight": (sq * weight[index]).sum((1, 2))}


def embedding_grads(module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-example gradient contributions of an Embedding layer.

    Args:
        module: the ``nn.Embedding``.
        x: integer indices ``[N]`` or ``[N, *]``.
        go: gradient w.r.t. its output ``[N, *, D]``.
        names: ``("weight",)`` or empty.

    Returns:
        ``{"weight": [N, V, D]}`` if asked.
    """
    if "weight" not in names:
        return {}
    emb = cast(nn.Embedding, module)  # typing only, no check (see register_kernel)
    idx, go = _prepare(emb, x, go)
    n, d = idx.shape[0], go.shape[-1]
    grads = go.new_zeros(n * emb.num_embeddings, d).index_add_(0, _keys(emb, idx), go.reshape(-1, d))
    return {"weight": grads.view(n, emb.num_embeddings, d)}


KERNEL = Kernel(
    norms=embedding_norms,
    grads=embedding_grads,
    params=("weight",),
    min_dim=lambda m: 1,
    pairs=embedding_pairs,
)
