"""The contract every per-example kernel fulfils, and the dtype and memory rules they share.

A kernel turns what one forward call of a layer saw (its first input ``x``) and the
gradient of the loss with respect to that call's output (``go``) into, for each
example ``n`` of the batch, either

* the squared L2 norm of example ``n``'s contribution to each parameter's gradient
  (``norms``, the fast path: nothing of parameter size per example is formed), or
* the contribution itself (``grads``, ``[N, *param.shape]``), needed when several
  contributions to one parameter must be summed before the norm is taken
  (tied weights, a layer called twice).

Under a diagonal preconditioner ``P`` (:mod:`noisescale.preconditioner`) a kernel also gives
the weighted squared norms ``sum_j P_j c_nj^2`` of each contribution ``c_n`` (``pairs``):
by a cheap exact form where one exists, else (:func:`norm_pairs`) from the ``grads`` path,
a chunk of examples at a time (:func:`chunk_rows`).

"Contribution of example n" means the terms of the batch gradient whose batch index
is ``n``: with a mean-reduced loss it is ``g_n / N``, exactly as backward computed it.

Shape letters used by all kernels: ``N`` examples (dim 0), ``T`` positions per
example (sequence positions or flattened spatial positions), ``F`` input features,
``O`` output features, ``D`` embedding size, ``V`` vocabulary size, ``K`` normalized
elements, ``C`` channels, ``G`` convolution groups.

References:
    Goodfellow (2015), Efficient Per-Example Gradient Computations, arXiv:1510.01799.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "CHUNK_ELEMENTS",
    "GradFn",
    "Kernel",
    "NormFn",
    "PairFn",
    "accumulation_dtype",
    "chunk_rows",
    "norm_pairs",
    "pairs_from_grads",
    "upcast",
    "weighted_sq_norm",
    "weighted_sq_norms",
]

NormFn = Callable[[nn.Module, Tensor, Tensor, tuple[str, ...]], dict[str, Tensor]]
"""``(module, x, go, names) -> {name: [N] squared norms}`` for the parameter names asked."""

GradFn = Callable[[nn.Module, Tensor, Tensor, tuple[str, ...]], dict[str, Tensor]]
"""``(module, x, go, names) -> {name: [N, *param.shape] contributions}``."""

Norms = dict[str, Tensor]
PairFn = Callable[[nn.Module, Tensor, Tensor, tuple[str, ...], dict[str, Tensor]], tuple[Norms, Norms]]
"""``(module, x, go, names, weights) -> ({name: [N]} squared norms, {name: [N]} P-weighted ones)``,
``weights[name]`` the ``[*param.shape]`` diagonal preconditioner of that parameter."""


class Kernel(NamedTuple):
    """Per-example gradient maths of one layer type.

    Attributes:
        norms: fast path, per-example squared norms ``[N]`` per parameter name.
        grads: materialising path, per-example contributions ``[N, *param.shape]``.
        params: names of the directly owned parameters the kernel handles; a layer
            with any other trainable parameter is unsupported.
        min_dim: dimensions the first input needs, batch dimension included, given
            the layer (an unbatched input would make dim 0 something else than examples).
        pairs: under a preconditioner, the plain and the weighted norms at once (sharing
            their work); None: ``norms``, and the weighted ones from ``grads`` on chunks of
            examples, which assumes example ``n``'s contribution depends on row ``n`` of
            the input and output gradient only (:func:`norm_pairs`).
    """

    norms: NormFn
    grads: GradFn
    params: tuple[str, ...]
    min_dim: Callable[[nn.Module], int]
    pairs: PairFn | None = None


CHUNK_ELEMENTS = 1 << 20
"""Most elements of per-example temporaries a kernel forms at once (4 MiB in float32).

Kernels loop over chunks of examples so that their temporaries (patches, Gram
matrices, materialised contributions) stay this small whatever the batch: bounded
memory, and on CPU buffers that stay in cache and in the allocator's heap instead of
freshly mapped (page-faulting) memory.
"""


def chunk_rows(per_row: int) -> int:
    """Examples per chunk when each needs ``per_row`` temporary elements (at least one).

    Args:
        per_row: temporary elements one example needs.

    Returns:
        ``max(1, CHUNK_ELEMENTS // per_row)``.
    """
    return max(1, CHUNK_ELEMENTS // max(1, per_row))


# Squares of fp16/bf16 gradients (times an AMP loss scale) overflow or lose all
# precision: reductions run in float32 at least.
_WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run in: ``dtype`` itself, or float32 for float16/bfloat16.

    Args:
        dtype: dtype of a gradient or input.

    Returns:
        float32 for half types, else ``dtype``.
    """
    return _WIDER.get(dtype, dtype)


def upcast(x: Tensor, go: Tensor) -> tuple[Tensor, Tensor]:
    """Cast a layer input and its output gradient to one dtype of at least float32.

    Args:
        x: floating layer input, any shape.
        go: gradient with respect to the layer output, any shape.

    Returns:
        ``(x, go)`` in ``promote(x, go)`` widened to float32 if it is a half type;
        tensors already in that dtype are returned as they are (no copy).
    """
    if x.dtype is go.dtype and x.dtype not in _WIDER:  # the common case, without dispatching
        return x, go
    dtype = accumulation_dtype(torch.promote_types(x.dtype, go.dtype))
    return x.to(dtype), go.to(dtype)


def weighted_sq_norm(contributions: Tensor, weight: Tensor) -> Tensor:
    """``[N, *P]`` contributions -> ``[N]`` squared norms weighted by ``weight`` ``[*P]``.

    One elementwise square, then one matrix-vector product with the weights.
    """
    sq = contributions.square().flatten(1)
    return sq @ weight.to(sq.dtype).flatten()


def weighted_sq_norms(grads: dict[str, Tensor], weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """:func:`weighted_sq_norm` of every ``{name: [N, *P]}`` with ``weights[name]``: ``{name: [N]}``."""
    return {name: weighted_sq_norm(g, weights[name]) for name, g in grads.items()}


def pairs_from_grads(grads: GradFn) -> PairFn:
    """The :data:`PairFn` of a kernel whose contributions are small (a norm layer's ``[N, K]``).

    Both norms come from one call of ``grads`` on the whole batch.
    """

    def pairs(
        module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...], weights: dict[str, Tensor]
    ) -> tuple[Norms, Norms]:
        contributions = grads(module, x, go, names)
        plain = {name: g.flatten(1).square().sum(1) for name, g in contributions.items()}
        return plain, weighted_sq_norms(contributions, weights)

    return pairs


def norm_pairs(
    kernel: Kernel,
    module: nn.Module,
    x: Tensor,
    go: Tensor,
    names: tuple[str, ...],
    weights: dict[str, Tensor],
) -> tuple[Norms, Norms]:
    """Plain and ``weights``-weighted per-example squared norms of the parameters ``names``.

    Args:
        kernel: the layer's kernel (its ``pairs``, else ``norms`` and ``grads``).
        module: the layer.
        x: its input ``[N, *]``.
        go: gradient w.r.t. its output ``[N, *]``.
        names: parameter names to compute.
        weights: ``{name: [*P]}`` non-negative weights (a diagonal preconditioner).

    Returns:
        ``({name: [N]}, {name: [N]})``; the weighted ones without ``pairs`` from ``grads`` on
        :func:`chunk_rows` examples at a time (of the largest parameter's size each).
    """
    if kernel.pairs is not None:
        return kernel.pairs(module, x, go, names, weights)
    plain = kernel.norms(module, x, go, names)
    rows = chunk_rows(max(weights[name].numel() for name in names))
    parts = [
        weighted_sq_norms(kernel.grads(module, a, b, names), weights)
        for a, b in zip(x.split(rows), go.split(rows), strict=True)
    ]
    return plain, {name: torch.cat([part[name] for part in parts]) for name in names}
