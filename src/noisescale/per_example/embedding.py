"""Per-example gradient norms of ``nn.Embedding`` (weight ``[V, D]``).

Example ``n``'s contribution adds ``go_nt`` into row ``idx_nt`` for each position
``t``, so its squared norm is

.. math::

    \\sum_{t,s} [idx_t = idx_s] (go_t \\cdot go_s) = \\sum_t go_t \\cdot S_{idx_t},

with ``S_v`` the sum of ``go_t`` over the example's positions holding index ``v``.
Instead of the ``[N, T, T]`` masked Gram matrix (Li et al. 2022) the kernel sorts
the keys ``n V + idx`` and sums each run of equal keys with ``index_add_``:
``O(N T D)`` work and memory, no host synchronisation, exact. Positions holding
``padding_idx`` get no gradient; ``scale_grad_by_freq`` divides each position by
its index's count in the whole mini-batch, as PyTorch's backward does.

Shape letters: ``N`` examples, ``T`` positions per example, ``D`` embedding size,
``V`` vocabulary size.

References:
    Li et al. (2022), Large Language Models Can Be Strong Differentially Private
    Learners, arXiv:2110.05679, appendix (embedding ghost norm).
    Gray et al. (2023), Efficient and Approximate Per-Example Gradient Norms for
    Gradient Noise Scale, WANT@NeurIPS.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from noisescale.per_example.kernel import Kernel, accumulation_dtype

__all__ = ["KERNEL", "embedding_grads", "embedding_norms"]


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
    idx, go = _prepare(module, x, go)
    n, t = idx.shape
    if t == 1:
        return {"weight": go.square().sum((1, 2))}
    keys, order = _keys(module, idx).sort()  # example n owns sorted slots [n T, (n + 1) T)
    rows = go.reshape(n * t, -1)[order]  # [N T, D]
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[1:] = keys[1:] != keys[:-1]
    run = starts.cumsum(0) - 1  # run id of each slot, [N T]
    sums = torch.zeros_like(rows).index_add_(0, run, rows)  # S per run, [N T, D]
    return {"weight": (rows * sums[run]).sum(1).view(n, t).sum(1)}


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
    idx, go = _prepare(module, x, go)
    n, d = idx.shape[0], go.shape[-1]
    grads = go.new_zeros(n * module.num_embeddings, d).index_add_(0, _keys(module, idx), go.reshape(-1, d))
    return {"weight": grads.view(n, module.num_embeddings, d)}


KERNEL = Kernel(norms=embedding_norms, grads=embedding_grads, params=("weight",), min_dim=lambda m: 1)
