r"""Per-example gradient norms of ``nn.LayerNorm`` and ``nn.RMSNorm``.

With ``y = x_hat * weight + bias`` over the last ``len(normalized_shape)`` dims,
example ``n``'s contributions are

.. math::

    \Delta weight_n = \sum_t go_{nt} \odot \hat x_{nt}, \qquad \Delta bias_n = \sum_t go_{nt},

both of parameter size (``[K]``), so the materialising and the norm paths coincide (and
under a preconditioner the weighted norms come from the same contributions).
Gray et al. (2024) show these LayerNorm per-example norms alone predict the total noise
scale of transformers.

Two exact routes to ``sum_t go_nt * x_hat_nt``:

* **from the output** (on CPU): the forward hook keeps the layer's output ``y`` too, and
  ``sum_t go_nt * x_hat_nt = (sum_t go_nt * y_nt - bias * sum_t go_nt) / weight``: one
  product and two sums over the activations, the bias sum being needed anyway. On a
  2-core CPU each pass over a ``[32, 64, 96]`` activation costs 50-100 us, mostly waking
  the threads, and this route is 2.6 times as fast as recomputing (112 against 291 us a
  layer). Its rounding error is the recompute route's times at most ``1 + 2 |bias/weight|``
  per element, so it is taken only where ``|bias_k| < 256 |weight_k|`` for every ``k``
  (error below ``5e2`` float32 roundings, 3e-5 relative; a zero weight is excluded), and
  only if ``y`` was not modified in place since the forward (its version counter).
* **recompute**: ``x_hat`` from the stored input with the layer's own ``eps``
  (``F.layer_norm`` / ``F.rms_norm`` without affine parameters), everywhere else (on
  accelerators it saves the host synchronisation the check above needs).

Shape letters: ``N`` examples, ``T`` positions (dims between the batch and the
normalized dims, flattened), ``K`` normalized elements (``normalized_shape``, any rank).

References:
    Ba, Kiros, Hinton (2016), Layer Normalization, arXiv:1607.06450.
    Gray et al. (2024), Normalization Layer Per-Example Gradients are Sufficient to
    Predict Gradient Noise Scale in Transformers, arXiv:2411.00999.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.kernel import Kernel, pairs_from_grads, upcast

__all__ = [
    "LAYER_NORM_KERNEL",
    "OUTPUT_ROUTE_RATIO",
    "RMS_NORM_KERNEL",
    "NormCall",
    "affine_grads",
    "grads_to_norms",
]


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


OUTPUT_ROUTE_RATIO = 256.0
"""Largest ``|bias_k / weight_k|`` at which the output route is taken (see the module docstring)."""


class NormCall(NamedTuple):
    """What a norm layer's forward hook keeps: its input, its output and the output's version then."""

    x: Tensor
    y: Tensor
    y_version: int


def _keep(module: nn.Module, x: Tensor, y: Tensor) -> NormCall:
    """The input, and the output detached (held by the hook on the output: no reference cycle)."""
    del module
    return NormCall(x, y.detach(), y._version)  # a detached tensor shares the version counter


def _from_output(
    call: NormCall,
    go: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    shape: tuple[int, ...],
    names: tuple[str, ...],
) -> dict[str, Tensor] | None:
    """The weight (and bias) contributions from the layer output, or None where that route is not taken."""
    y = call.y
    if y.device.type != "cpu" or y._version != call.y_version:
        return None
    w = weight.detach()
    b = None if bias is None else bias.detach()
    well_conditioned = (w != 0).all() if b is None else (b.abs() < OUTPUT_ROUTE_RATIO * w.abs()).all()
    if not bool(well_conditioned):
        return None
    view = (go.shape[0], -1, *shape)
    go_sum = go.reshape(view).sum(1)  # [N, *K]
    weighted = torch.mul(go, y.to(go.dtype)).reshape(view).sum(1)  # sum_t go * y
    if b is not None:
        weighted.sub_(go_sum * b)
    out = {"weight": weighted.div_(w)}
    if "bias" in names:
        out["bias"] = go_sum
    return out


def _affine_norm_grads(
    x: Tensor | NormCall,
    go: Tensor,
    norm: nn.LayerNorm | nn.RMSNorm,
    names: tuple[str, ...],
    x_hat: Any,
) -> dict[str, Tensor]:
    """Both routes: from the output when ``x`` is a :class:`NormCall` and it applies, else ``x_hat(x)``."""
    shape = tuple(norm.normalized_shape)
    if isinstance(x, NormCall):
        if "weight" in names:
            out = _from_output(x, upcast(x.x, go)[1], norm.weight, getattr(norm, "bias", None), shape, names)
            if out is not None:
                return out
        x = x.x
    x, go = upcast(x, go)
    return affine_grads(x_hat(x, shape) if "weight" in names else x, go, shape, names)


def layer_norm_grads(
    module: nn.Module, x: Tensor | NormCall, go: Tensor, names: tuple[str, ...]
) -> dict[str, Tensor]:
    """Per-example contributions of a LayerNorm's weight and bias.

    Args:
        module: the ``nn.LayerNorm`` (``elementwise_affine=True``).
        x: its input ``[N, *, *K]``, or the :class:`NormCall` its forward hook kept.
        go: gradient w.r.t. its output, same shape.
        names: subset of ``("weight", "bias")``.

    Returns:
        ``{name: [N, *K]}``.
    """
    norm = cast(nn.LayerNorm, module)  # typing only, no check (see register_kernel)
    return _affine_norm_grads(x, go, norm, names, lambda x, shape: F.layer_norm(x, shape, eps=norm.eps))


def rms_norm_grads(
    module: nn.Module, x: Tensor | NormCall, go: Tensor, names: tuple[str, ...]
) -> dict[str, Tensor]:
    """Per-example contributions of an RMSNorm's weight.

    Args:
        module: the ``nn.RMSNorm`` (``elementwise_affine=True``).
        x: its input ``[N, *, *K]``, or the :class:`NormCall` its forward hook kept.
        go: gradient w.r.t. its output, same shape.
        names: ``("weight",)`` or empty.

    Returns:
        ``{"weight": [N, *K]}`` if asked.
    """
    norm = cast(nn.RMSNorm, module)  # typing only, no check (see register_kernel)
    dtype = (x.x if isinstance(x, NormCall) else x).dtype
    eps = norm.eps if norm.eps is not None else torch.finfo(dtype).eps  # eps of the forward dtype
    return _affine_norm_grads(x, go, norm, names, lambda x, shape: F.rms_norm(x, shape, eps=eps))


def _min_dim(module: nn.Module) -> int:
    return len(cast("nn.LayerNorm | nn.RMSNorm", module).normalized_shape) + 1


LAYER_NORM_KERNEL = Kernel(
    norms=lambda m, x, go, names: grads_to_norms(layer_norm_grads(m, x, go, names)),
    grads=layer_norm_grads,
    params=("weight", "bias"),
    min_dim=_min_dim,
    pairs=pairs_from_grads(layer_norm_grads),
    keep=_keep,
)
RMS_NORM_KERNEL = Kernel(
    norms=lambda m, x, go, names: grads_to_norms(rms_norm_grads(m, x, go, names)),
    grads=rms_norm_grads,
    params=("weight",),
    min_dim=_min_dim,
    pairs=pairs_from_grads(rms_norm_grads),
    keep=_keep,
)
