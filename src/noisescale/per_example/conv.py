"""Per-example gradient norms of ``nn.Conv1d`` and ``nn.Conv2d``.

A convolution is a Linear layer applied at every output position to the patch of
input it sees. The patches are a strided view of the (explicitly padded) input,
``[N G, C k / G, T]`` with ``T`` output positions and the groups folded into the
batch; the weight ``[O, C/G, *k]`` acts on them as an ``[O / G, C k / G]`` matrix
per group. With the output gradients as ``[N G, T, O / G]`` the sequence-Linear
kernels of :mod:`noisescale.per_example.linear` apply unchanged, Gram or
materialising route included (Li et al. 2022); per-group norms are then summed per
example. The bias contribution is the output gradient summed over positions.

The patches are copied out of the view a chunk of examples at a time
(:func:`~noisescale.per_example.kernel.chunk_rows`) into one reused buffer:
``F.unfold`` (im2col) writes all ``N C k T`` of them at once, which is slow on CPU
(a gather with short runs into freshly mapped memory) and can be far larger than
the layer's activations. Padding (any ``padding_mode``, ``padding="same"``
included) is applied with ``F.pad`` as the layer's forward applies it. Conv1d and
Conv2d share the code (the view has one spatial dimension or two).

Shape letters: ``N`` examples, ``C`` in-channels, ``O`` out-channels, ``G`` groups,
``k`` kernel elements, ``T`` output positions, ``S`` spatial dims.

References:
    Goodfellow (2015), Efficient Per-Example Gradient Computations, arXiv:1510.01799.
    Rochette, Manoel, Tramel (2019), Efficient Per-Example Gradient Computations in
    Convolutional Neural Networks, arXiv:1912.06015.
    Li et al. (2022), Large Language Models Can Be Strong Differentially Private
    Learners, arXiv:2110.05679 (ghost clipping for convolutions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisescale import _torch_compat as tc
from noisescale.per_example.kernel import Kernel, chunk_rows, upcast
from noisescale.per_example.linear import sequence_weight_grads, sequence_weight_norms

__all__ = ["CONV1D_KERNEL", "CONV2D_KERNEL", "conv_grads", "conv_norms"]


def _padded(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """The input as the convolution sees it, ``[N, C, *S]`` padded, contiguous."""
    padding = tc.conv_padding(module)
    if not any(padding):
        return x.contiguous()
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, padding, mode=mode).contiguous()


def _patches(module: nn.Conv1d | nn.Conv2d, x: Tensor, out_size: tuple[int, ...]) -> Tensor:
    """Strided view ``[N G, C/G, *k, *S_out]`` of the padded input: patch of each output position."""
    x = _padded(module, x)
    cg = x.shape[1] // module.groups
    s_c, *s_pos = x.stride()[1:]  # contiguous: example n, group g is row n G + g, cg channels apart
    size = (x.shape[0] * module.groups, cg, *module.kernel_size, *out_size)
    steps = (
        *(s * d for s, d in zip(s_pos, module.dilation, strict=True)),
        *(s * st for s, st in zip(s_pos, module.stride, strict=True)),
    )
    return x.as_strided(size, (cg * s_c, s_c, *steps))


def _chunks(module: nn.Conv1d | nn.Conv2d, x: Tensor, go: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(patches [R, T, C k / G], grads [R, T, O / G])`` for consecutive chunks of example-groups.

    The ``N G`` example-groups are taken in order; the patches live in one buffer,
    overwritten by the next chunk.
    """
    windows = _patches(module, x, tuple(go.shape[2:]))
    rows, depth, t = windows.shape[0], module.weight[0].numel(), math.prod(go.shape[2:])  # N G, C k / G, T
    go = go.reshape(rows, -1, t)  # [N G, O / G, T]
    step = chunk_rows(depth * t)
    buffer = x.new_empty(min(step, rows), *windows.shape[1:])
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = buffer[: stop - start]
        chunk.copy_(windows[start:stop])
        yield chunk.view(stop - start, depth, t).mT, go[start:stop].mT


def _weight_parts(
    module: nn.Conv1d | nn.Conv2d, x: Tensor, go: Tensor, fn: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """``fn(patches, grads)`` over all chunks, concatenated along the ``N G`` example-groups."""
    parts = [fn(cols, g) for cols, g in _chunks(module, x, go)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
    conv = cast("nn.Conv1d | nn.Conv2d", module)  # typing only, no check (see register_kernel)
    x, go = upcast(x, go)
    n = x.shape[0]
    out = {}
    if "weight" in names:
        out["weight"] = _weight_parts(conv, x, go, sequence_weight_norms).view(n, -1).sum(1)
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
    conv = cast("nn.Conv1d | nn.Conv2d", module)  # typing only, no check (see register_kernel)
    x, go = upcast(x, go)
    n = x.shape[0]
    out = {}
    if "weight" in names:
        grads = _weight_parts(conv, x, go, sequence_weight_grads)  # [N G, O/G, C k/G]
        out["weight"] = grads.reshape(n, *conv.weight.shape)
    if "bias" in names:
        out["bias"] = go.reshape(n, go.shape[1], -1).sum(2)
    return out


CONV1D_KERNEL = Kernel(norms=conv_norms, grads=conv_grads, params=("weight", "bias"), min_dim=lambda m: 3)
CONV2D_KERNEL = Kernel(norms=conv_norms, grads=conv_grads, params=("weight", "bias"), min_dim=lambda m: 4)
