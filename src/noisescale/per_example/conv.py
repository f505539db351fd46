"""Per-example gradient norms of ``nn.Conv1d`` and ``nn.Conv2d``.

A convolution is a Linear layer applied at every output position to the patch of
input it sees: ``F.unfold`` (im2col) lays the patches out as ``[N, C k, T]`` with
``T`` output positions, and the weight ``[O, C/G, *k]`` acts on them as an
``[O, C k / G]`` matrix per group. With the groups folded into the batch
(``[N G, T, C k / G]`` patches, ``[N G, T, O / G]`` output gradients) the
sequence-Linear kernels of :mod:`noisescale.per_example.linear` apply unchanged,
Gram or materialising route included (Li et al. 2022); per-group norms are then
summed per example. The bias contribution is the output gradient summed over
positions. Conv1d is handled as a Conv2d of height one. Padding modes other than
zeros, and ``padding="same"``, pad the input explicitly first.

Shape letters: ``N`` examples, ``C`` in-channels, ``O`` out-channels, ``G`` groups,
``k`` kernel elements, ``T`` output positions.

References:
    Goodfellow (2015), Efficient Per-Example Gradient Computations, arXiv:1510.01799.
    Rochette, Manoel, Tramel (2019), Efficient Per-Example Gradient Computations in
    Convolutional Neural Networks, arXiv:1912.06015.
    Li et al. (2022), Large Language Models Can Be Strong Differentially Private
    Learners, arXiv:2110.05679 (ghost clipping for convolutions).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from noisescale.per_example.kernel import Kernel, upcast
from noisescale.per_example.linear import sequence_weight_grads, sequence_weight_norms

__all__ = ["CONV1D_KERNEL", "CONV2D_KERNEL", "conv_grads", "conv_norms"]


def _patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """im2col: ``[N, C, *S]`` -> ``[N, C k, T]`` (channels outermost in the middle dim)."""
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(module.kernel_size)
    kernel_size, dilation, stride = module.kernel_size, module.dilation, module.stride
    if x.dim() == 3:  # Conv1d as a Conv2d of height 1
        x = x.unsqueeze(2)
        kernel_size, dilation, stride = (1, *kernel_size), (1, *dilation), (1, *stride)
        padding = (0, *padding)
    return F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)


def _as_sequence(module: nn.Conv1d | nn.Conv2d, x: Tensor, go: Tensor) -> tuple[Tensor, Tensor]:
    """Patches ``[N G, T, C k / G]`` and output gradients ``[N G, T, O / G]``."""
    n, g = x.shape[0], module.groups
    cols = _patches(module, x)  # [N, C k, T]
    t = cols.shape[-1]
    return cols.reshape(n * g, -1, t).mT, go.reshape(n * g, -1, t).mT


def conv_norms(module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-example squared gradient norms of a Conv1d/Conv2d layer.

    Args:
        module: the ``nn.Conv1d`` or ``nn.Conv2d``.
        x: its input ``[N, C, L]`` or ``[N, C, H, W]``.
        go: gradient w.r.t. its output ``[N, O, *S_out]``.
        names: subset of ``("weight", "bias")``.

    Returns:
        ``{name: [N]}``.
    """
    x, go = upcast(x, go)
    n = x.shape[0]
    out = {}
    if "weight" in names:
        out["weight"] = sequence_weight_norms(*_as_sequence(module, x, go)).view(n, -1).sum(1)
    if "bias" in names:
        out["bias"] = go.reshape(n, go.shape[1], -1).sum(2).square().sum(1)
    return out


def conv_grads(module: nn.Module, x: Tensor, go: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-example gradient contributions of a Conv1d/Conv2d layer.

    Args:
        module: the ``nn.Conv1d`` or ``nn.Conv2d``.
        x: its input ``[N, C, L]`` or ``[N, C, H, W]``.
        go: gradient w.r.t. its output ``[N, O, *S_out]``.
        names: subset of ``("weight", "bias")``.

    Returns:
        ``{"weight": [N, O, C/G, *k], "bias": [N, O]}`` restricted to ``names``.
    """
    x, go = upcast(x, go)
    n = x.shape[0]
    out = {}
    if "weight" in names:
        grads = sequence_weight_grads(*_as_sequence(module, x, go))  # [N G, O/G, C k/G]
        out["weight"] = grads.reshape(n, *module.weight.shape)
    if "bias" in names:
        out["bias"] = go.reshape(n, go.shape[1], -1).sum(2)
    return out


CONV1D_KERNEL = Kernel(norms=conv_norms, grads=conv_grads, params=("weight", "bias"), min_dim=lambda m: 3)
CONV2D_KERNEL = Kernel(norms=conv_norms, grads=conv_grads, params=("weight", "bias"), min_dim=lambda m: 4)
