"""Per-example gradient norms of ``nn.GroupNorm`` (weight and bias ``[C]``).

GroupNorm normalizes each example on its own (over channel groups and positions),
so unlike BatchNorm its per-example gradients are well defined, which makes it the
drop-in replacement suggested for BatchNorm. Example ``n``'s contributions are
``sum_s go_ncs x_hat_ncs`` and ``sum_s go_ncs`` per channel ``c``, with ``x_hat``
recomputed by ``F.group_norm`` without affine parameters.

Shape letters: ``N`` examples, ``C`` channels, ``S`` positions (spatial dims, flattened).

References:
    Wu, He (2018), Group Normalization, ECCV, arXiv:1803.08494.
"""

from __future__ import annotations

from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.kernel import Kernel, pairs_from_grads, upcast
from noisescale.per_example.layernorm import affine_grads, grads_to_norms

__all__ = ["KERNEL", "group_norm_grads"]


def group_norm_grads(module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-example contributions of a GroupNorm's weight and bias.

    Args:
        module: the ``nn.GroupNorm`` (``affine=True``).
        x: its input ``[N, C, *S]``.
        go: gradient w.r.t. its output, same shape.
        names: subset of ``("weight", "bias")``.

    Returns:
        ``{name: [N, C]}``.
    """
    norm = cast(nn.GroupNorm, module)  # typing only, no check (see register_kernel)
    x, go = upcast(x, go)
    x_hat = F.group_norm(x, norm.num_groups, eps=norm.eps) if "weight" in names else x
    return affine_grads(x_hat, go, (norm.num_channels,), names, channel_dim=1)


KERNEL = Kernel(
    norms=lambda m, x, go, names: grads_to_norms(group_norm_grads(m, x, go, names)),
    grads=group_norm_grads,
    params=("weight", "bias"),
    min_dim=lambda m: 2,
    pairs=pairs_from_grads(group_norm_grads),
)
