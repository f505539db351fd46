r"""Per-example gradient norms of ``nn.Linear`` (weight ``[O, F]``, bias ``[O]``).

Example ``n``'s weight contribution is ``sum_t go_nt x_nt^T`` (an ``[O, F]`` matrix).
For a ``[N, F]`` input (one position) its squared norm factorises,

.. math::

    |go_n x_n^T|_F^2 = |go_n|^2 |x_n|^2,

two row-wise reductions and a product (Goodfellow 2015). For a ``[N, T, F]`` input
(middle dims flattened to ``T``) either form the Gram matrices,

.. math::

    |\sum_t go_t x_t^T|_F^2 = \sum_{t,s} (go_t \cdot go_s)(x_t \cdot x_s),

costing ``N T^2 (O + F)`` multiply-adds and ``N T^2`` memory, or materialise the
``[N, O, F]`` contribution at ``N T O F``. Li et al. (2022, ghost clipping; used for
the noise scale by Gray et al. 2023) pick the route with less memory (Gram when
``2 T^2 < O F``); here the one with fewer multiply-adds is taken (Gram when
``T^2 (O + F + 1) < (T + 1) O F``, the last terms being the final reductions), and
memory is bounded instead by working on chunks of examples
(:func:`~noisescale.per_example.kernel.chunk_rows`). At ``T = O = F = 128``, for
instance, materialising does ``T O F`` and the Gram route ``2 T O F``.
The bias contribution is ``sum_t go_t``; on the Gram route its squared norm is the sum of
``go``'s Gram matrix, already formed.

Under a diagonal preconditioner ``P`` (:mod:`noisescale.preconditioner`) the weighted squared
norm of a ``[N, F]`` input's contribution is again cheap and exact,
``sum_{o,f} P_of go_no^2 x_nf^2 = ((go_n^2)^T P) . x_n^2`` (one ``[N, O] @ [O, F]`` product);
a sequence's has no such form and is taken from the materialised ``[N, O, F]`` contributions,
a chunk of examples at a time, which give the plain norms too.

Shape letters: ``N`` examples, ``T`` positions, ``F`` in-features, ``O`` out-features.

References:
    Goodfellow (2015), Efficient Per-Example Gradient Computations, arXiv:1510.01799.
    Li, Tramèr, Liang, Hashimoto (2022), Large Language Models Can Be Strong
    Differentially Private Learners, ICLR, arXiv:2110.05679, section 4 (ghost clipping).
    Gray et al. (2023), Efficient and Approximate Per-Example Gradient Norms for
    Gradient Noise Scale, WANT@NeurIPS.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from noisescale.per_example.kernel import Kernel, Norms, chunk_rows, upcast

__all__ = [
    "KERNEL",
    "linear_grads",
    "linear_norms",
    "linear_pairs",
    "sequence_norms",
    "sequence_weight_grads",
    "sequence_weight_norms",
    "use_gram",
]


def use_gram(t: int, o: int, f: int) -> bool:
    """Whether the Gram route takes fewer multiply-adds: ``T^2 (O + F + 1) < (T + 1) O F``.

    Args:
        t: positions per example.
        o: output features.
        f: input features.

    Returns:
        True to use Gram matrices, False to materialise ``[N, O, F]``.
    """
    return t * t * (o + f + 1) < (t + 1) * o * f


def _gram_norms(x: Tensor, go: Tensor) -> tuple[Tensor, Tensor]:
    """``[R, T, F]``, ``[R, T, O]`` -> ``[R]`` weight and ``[R]`` bias squared norms, by the Grams.

    The bias's ``|sum_t go_t|^2 = sum_{t,s} go_t . go_s`` is the sum of ``go``'s Gram matrix.
    """
    go_gram = torch.bmm(go, go.mT)
    return torch.bmm(x, x.mT).mul_(go_gram).sum((1, 2)), go_gram.sum((1, 2))


def _materialised_norms(x: Tensor, go: Tensor) -> tuple[Tensor, None]:
    """``[R, T, F]``, ``[R, T, O]`` -> ``[R]`` through the ``[R, O, F]`` contributions (no bias norms)."""
    return torch.linalg.vector_norm(torch.bmm(go.mT, x), dim=(1, 2)).square(), None


def sequence_norms(x: Tensor, go: Tensor) -> tuple[Tensor, Tensor | None]:
    """Squared norms of ``sum_t go_nt x_nt^T``, by the cheaper exact route, in chunks of examples.

    Args:
        x: inputs ``[N, T, F]``.
        go: output gradients ``[N, T, O]``.

    Returns:
        ``[N]`` squared Frobenius norms, and on the Gram route the ``[N]`` squared norms of
        ``sum_t go_nt`` (a bias's contributions) from the same Gram matrices (else None).
    """
    t, f, o = x.shape[1], x.shape[2], go.shape[2]
    norms, per_row = (_gram_norms, 3 * t * t) if use_gram(t, o, f) else (_materialised_norms, o * f)
    rows = chunk_rows(per_row)
    if rows >= x.shape[0]:
        return norms(x, go)
    parts = [norms(a, b) for a, b in zip(x.split(rows), go.split(rows), strict=True)]
    bias = [b for _, b in parts if b is not None]
    return torch.cat([w for w, _ in parts]), torch.cat(bias) if bias else None


def sequence_weight_norms(x: Tensor, go: Tensor) -> Tensor:
    """The ``[N]`` weight part of :func:`sequence_norms` (``x`` ``[N, T, F]``, ``go`` ``[N, T, O]``)."""
    return sequence_norms(x, go)[0]


def sequence_weight_grads(x: Tensor, go: Tensor) -> Tensor:
    """Per-example weight contributions ``sum_t go_nt x_nt^T``.

    Args:
        x: inputs ``[N, T, F]``.
        go: output gradients ``[N, T, O]``.

    Returns:
        ``[N, O, F]``.
    """
    return torch.bmm(go.mT, x)


def _row_sq_norms(t: Tensor) -> Tensor:
    """``[N, F]`` -> ``[N]`` squared row norms, in one reduction pass (no ``[N, F]`` temporary)."""
    return torch.linalg.vector_norm(t, dim=1).square()


def _as_sequence(x: Tensor, go: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, *, F]``, ``[N, *, O]`` -> ``[N, T, F]``, ``[N, T, O]``."""
    n = x.shape[0]
    return x.reshape(n, -1, x.shape[-1]), go.reshape(n, -1, go.shape[-1])


def linear_norms(module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-example squared gradient norms of a Linear layer.

    Args:
        module: the ``nn.Linear``.
        x: its input ``[N, F]`` or ``[N, *, F]``.
        go: gradient of the loss w.r.t. its output, ``[N, O]`` or ``[N, *, O]``.
        names: subset of ``("weight", "bias")`` to compute.

    Returns:
        ``{name: [N]}``.
    """
    del module
    x, go = upcast(x, go)
    out = {}
    if x.dim() == 2:
        go_sq = _row_sq_norms(go)  # [N]
        if "weight" in names:
            out["weight"] = go_sq * _row_sq_norms(x)
        if "bias" in names:
            out["bias"] = go_sq
        return out
    x, go = _as_sequence(x, go)
    bias = None
    if "weight" in names:
        out["weight"], bias = sequence_norms(x, go)
    if "bias" in names:
        out["bias"] = bias if bias is not None else go.sum(1).square().sum(1)
    return out


def linear_grads(module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-example gradient contributions of a Linear layer.

    Args:
        module: the ``nn.Linear``.
        x: its input ``[N, F]`` or ``[N, *, F]``.
        go: gradient w.r.t. its output, ``[N, O]`` or ``[N, *, O]``.
        names: subset of ``("weight", "bias")``.

    Returns:
        ``{"weight": [N, O, F], "bias": [N, O]}`` restricted to ``names``.
    """
    del module
    x, go = _as_sequence(*upcast(x, go))
    out = {}
    if "weight" in names:
        out["weight"] = sequence_weight_grads(x, go)
    if "bias" in names:
        out["bias"] = go.sum(1)
    return out


def sequence_weight_pairs(x: Tensor, go: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Plain and ``weight``-weighted squared norms of ``sum_t go_nt x_nt^T``, materialised in chunks.

    Args:
        x: inputs ``[N, T, F]``.
        go: output gradients ``[N, T, O]``.
        weight: ``[O, F]`` non-negative weights.

    Returns:
        ``([N], [N])``.
    """
    w = weight.to(x.dtype).flatten()
    plain, weighted = [], []
    rows = chunk_rows(w.numel())
    for a, b in zip(x.split(rows), go.split(rows), strict=True):
        sq = torch.bmm(b.mT, a).square_().flatten(1)  # [R, O F]
        plain.append(sq.sum(1))
        weighted.append(sq @ w)
    return torch.cat(plain), torch.cat(weighted)


def linear_pairs(
    module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...], weights: dict[str, Tensor]
) -> tuple[Norms, Norms]:
    """Plain and preconditioned per-example squared gradient norms of a Linear layer.

    Args:
        module: the ``nn.Linear``.
        x: its input ``[N, F]`` or ``[N, *, F]``.
        go: gradient w.r.t. its output, ``[N, O]`` or ``[N, *, O]``.
        names: subset of ``("weight", "bias")``.
        weights: ``{name: [O, F] or [O]}`` the diagonal preconditioner.

    Returns:
        ``({name: [N]}, {name: [N]})``.
    """
    del module
    x, go = upcast(x, go)
    plain, weighted = {}, {}
    if x.dim() == 2:
        go_sq = go.square()  # [N, O]
        if "weight" in names:
            x_sq = x.square()  # [N, F]
            plain["weight"] = go_sq.sum(1) * x_sq.sum(1)
            weighted["weight"] = ((go_sq @ weights["weight"].to(go.dtype)) * x_sq).sum(1)
        if "bias" in names:
            plain["bias"] = go_sq.sum(1)
            weighted["bias"] = go_sq @ weights["bias"].to(go.dtype)
        return plain, weighted
    x, go = _as_sequence(x, go)
    if "weight" in names:
        plain["weight"], weighted["weight"] = sequence_weight_pairs(x, go, weights["weight"])
    if "bias" in names:
        bias_sq = go.sum(1).square()  # [N, O]
        plain["bias"] = bias_sq.sum(1)
        weighted["bias"] = bias_sq @ weights["bias"].to(go.dtype)
    return plain, weighted


KERNEL = Kernel(
    norms=linear_norms, grads=linear_grads, params=("weight", "bias"), min_dim=lambda m: 2, pairs=linear_pairs
)
