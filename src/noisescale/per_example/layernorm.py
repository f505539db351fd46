r"""Per-example gradient norms of ``nn.LayerNorm`` and ``nn.RMSNorm``.

With ``y = x_hat * weight + bias`` over the last ``len(normalized_shape)`` dims,
example ``n``'s contributions are

.. math::

    \Delta weight_n = \sum_t go_{nt} \odot \hat x_{nt}, \qquad \Delta bias_n = \sum_t go_{nt},

both of parameter size (``[K]``), so the materialising and the norm paths coincide (and
under a preconditioner the weighted norms come from the same contributions).
``x_hat`` is recomputed from the stored input with the layer's own ``eps``
(``F.layer_norm`` / ``F.rms_norm`` without affine parameters). Gray et al. (2024)
show these LayerNorm per-example norms alone predict the total noise scale of
transformers.

Shape letters: ``N`` examples, ``T`` positions (dims between the batch and the
normalized dims, flattened), ``K`` normalized elements (``normalized_shape``, any rank).

References:
    Ba, Kiros, Hinton (2016), Layer Normalization, arXiv:1607.06450.
    Gray et al. (2024), Normalization Layer Per-Example Gradients are Sufficient to
    Predict Gradient Noise Scale in Transformers, arXiv:2411.00999.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.kernel import Kernel, pairs_from_grads, upcast

__all__ = ["LAYER_NORM_KERNEL", "RMS_NORM_KERNEL", "affine_grads", "grads_to_norms"]


def affine_grads(
    x_hat: Tensor, go: Tensor, shape: tuple[int, ...], names: tuple[str, ...], *, channel_dim: int = -1
) -> dict[str, Tensor]:
    """Per-example contributions of an elementwise affine ``x_hat * weight + bias``.

    Args:
        x_hat: normalized input ``[N, *]``, a temporary of the caller: overwritten when
            ``"weight"`` is asked (the product with ``go`` is formed in place).
        go: gradient w.r.t. the affine output, same shape.
        shape: parameter shape ``[*K]``.
        names: subset of ``("weight", "bias")``.
        channel_dim: ``-1`` when the parameters cover the trailing dims (LayerNorm),
            ``1`` when they cover dim 1 (GroupNorm's channels).

    Returns:
        ``{name: [N, *K]}``.
    """
    n = go.shape[0]
    # Sum over everything but the batch and the parameter dims.
    view, dim = ((n, shape[0], -1), 2) if channel_dim == 1 else ((n, -1, *shape), 1)
    out = {}
    if "weight" in names:
        out["weight"] = x_hat.mul_(go).reshape(view).sum(dim)
    if "bias" in names:
        out["bias"] = go.reshape(view).sum(dim)
    return out


def grads_to_norms(grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{name: [N, *P]}`` -> ``{name: [N]}`` squared L2 norms per example."""
    return {name: torch.linalg.vector_norm(g.flatten(1), dim=1).square() for name, g in grads.items()}


def layer_norm_grads(module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-example contributions of a LayerNorm's weight and bias.

    Args:
        module: the ``nn.LayerNorm`` (``elementwise_affine=True``).
        x: its input ``[N, *, *K]``.
        go: gradient w.r.t. its output, same shape.
        names: subset of ``("weight", "bias")``.

    Returns:
        ``{name: [N, *K]}``.
    """
    norm = cast(nn.LayerNorm, module)  # typing only, no check (see register_kernel)
    x, go = upcast(x, go)
    shape = tuple(norm.normalized_shape)
    x_hat = F.layer_norm(x, shape, eps=norm.eps) if "weight" in names else x
    return affine_grads(x_hat, go, shape, names)


def rms_norm_grads(module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-example contributions of an RMSNorm's weight.

    Args:
        module: the ``nn.RMSNorm`` (``elementwise_affine=True``).
        x: its input ``[N, *, *K]``.
        go: gradient w.r.t. its output, same shape.
        names: ``("weight",)`` or empty.

    Returns:
        ``{"weight": [N, *K]}`` if asked.
    """
    norm = cast(nn.RMSNorm, module)  # typing only, no check (see register_kernel)
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps  # eps of the forward dtype
    x, go = upcast(x, go)
    shape = tuple(norm.normalized_shape)
    return affine_grads(F.rms_norm(x, shape, eps=eps), go, shape, names)


def _min_dim(module: nn.Module) -> int:
    return len(cast("nn.LayerNorm | nn.RMSNorm", module).normalized_shape) + 1


LAYER_NORM_KERNEL = Kernel(
    norms=lambda m, x, go, names: grads_to_norms(layer_norm_grads(m, x, go, names)),
    grads=layer_norm_grads,
    params=("weight", "bias"),
    min_dim=_min_dim,
    pairs=pairs_from_grads(layer_norm_grads),
)
RMS_NORM_KERNEL = Kernel(
    norms=lambda m, x, go, names: grads_to_norms(rms_norm_grads(m, x, go, names)),
    grads=rms_norm_grads,
    params=("weight",),
    min_dim=_min_dim,
    pairs=pairs_from_grads(rms_norm_grads),
)
