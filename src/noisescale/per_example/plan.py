"""Which layers to hook, which group column each parameter feeds, and which are shared.

Built once, at construction, so the hooks only look things up. A parameter is
*shared* when more than one layer path owns it (tied weights, a layer registered
twice): the norm of a sum is not the sum of norms, so its per-example
contributions are materialised and summed before the norm is taken.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from noisescale.errors import UnsupportedLayerError
from noisescale.per_example.kernel import Kernel
from noisescale.per_example.registry import find_kernel, supported_types

__all__ = ["Unit", "build_units"]


@dataclass(eq=False)
class Unit:
    """One hooked layer and the parameters it accounts for (names relative to the layer).

    Attributes:
        path: the layer's name in ``model.named_modules()``.
        module: the layer.
        kernel: its kernel, or None for the recompute fallback.
        min_dim: dimensions the first input needs (kernels only).
        direct: trainable group parameters it owns directly.
        params: every parameter it may account for, by name.
        columns: group column of each of them.
        norm_names: names on the fast norm path (used by one layer only).
        shared_names: names that are materialised (shared with another layer).
        inner: fallback only: hooked layers inside it, with the names (relative to
            this layer) of their direct parameters; a call covers those of the inner
            layers it does not call itself (e.g. ``MultiheadAttention.out_proj``).
        pending: its forward calls whose graph is alive and not yet backpropagated
            (:class:`noisescale.per_example.collector._Call`, held weakly); with two or
            more as a backward reaches the layer, everything is materialised (a layer
            called twice shares its parameters with itself).
    """

    path: str
    module: nn.Module
    kernel: Kernel | None
    min_dim: int
    direct: tuple[str, ...]
    params: dict[str, nn.Parameter]
    columns: dict[str, int]
    norm_names: tuple[str, ...]
    shared_names: tuple[str, ...]
    inner: dict[Unit, tuple[str, ...]] = field(default_factory=dict)
    pending: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)


def group_columns(groups: Sequence[Sequence[Tensor]]) -> tuple[dict[int, int], int]:
    """Map ``id(param)`` to its group index, for the trainable parameters.

    Args:
        groups: G groups of parameters.

    Returns:
        ``({id(param): column}, G)``; parameters with ``requires_grad=False`` are left out.

    Raises:
        TypeError: if a group holds something that is not a tensor.
        ValueError: if a parameter is in two groups.
    """
    seen: dict[int, int] = {}
    columns: dict[int, int] = {}
    count = 0
    for j, group in enumerate(groups):
        count = j + 1
        for p in group:
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"Expected `groups[{j}]` to hold nn.Parameter tensors but got {type(p).__name__}."
                )
            if id(p) in seen:
                raise ValueError(
                    f"a parameter of shape {list(p.shape)} is in groups {seen[id(p)]} and {j}: "
                    "each parameter must belong to one group."
                )
            seen[id(p)] = j
            if p.requires_grad:
                columns[id(p)] = j
    return columns, count


def _unsupported_message(layers: list[str]) -> str:
    supported = ", ".join(sorted(t.__name__ for t in supported_types()))
    return (
        f"no exact per-example kernel for these layers with trainable parameters: {', '.join(layers)}. "
        "Fix: pass fallback=True (exact but slower: the layer is recomputed and differentiated once "
        "per example); or replace BatchNorm with GroupNorm or LayerNorm; or freeze these parameters or "
        "leave them out of `groups`; or register a kernel with noisescale.per_example.register_kernel. "
        f"Supported layers: {supported}."
    )


def _make_unit(
    path: str,
    module: nn.Module,
    kernel: Kernel | None,
    owned: dict[str, nn.Parameter],
    columns: dict[int, int],
    owners: Counter[int],
) -> Unit:
    shared = tuple(n for n, p in owned.items() if owners[id(p)] > 1)
    return Unit(
        path=path,
        module=module,
        kernel=kernel,
        min_dim=kernel.min_dim(module) if kernel is not None else 0,
        direct=tuple(owned),
        params=owned,
        columns={n: columns[id(p)] for n, p in owned.items()},
        norm_names=tuple(n for n in owned if n not in shared),
        shared_names=shared,
    )


def _link_fallbacks(units: dict[nn.Module, Unit], columns: dict[int, int], owners: Counter[int]) -> None:
    """Give each fallback unit the parameters of the hooked layers inside it."""
    for unit in units.values():
        if unit.kernel is not None:
            continue
        for rel, sub in unit.module.named_modules():
            inner = units.get(sub)
            if inner is None or sub is unit.module:
                continue
            names = tuple(f"{rel}.{n}" for n in inner.direct)
            unit.inner[inner] = names
            for name, n in zip(names, inner.direct, strict=True):
                p = inner.params[n]
                unit.params[name], unit.columns[name] = p, columns[id(p)]
                if owners[id(p)] > 1:
                    unit.shared_names += (name,)
                else:
                    unit.norm_names += (name,)


def build_units(
    model: nn.Module, groups: Sequence[Sequence[Tensor]], *, fallback: bool
) -> tuple[list[Unit], int]:
    """Plan the hooks for ``model`` and ``groups``.

    Args:
        model: the network.
        groups: G groups of its parameters.
        fallback: use the recompute fallback for layers without a kernel.

    Returns:
        ``(units, G)``.

    Raises:
        UnsupportedLayerError: a layer owning trainable group parameters has no kernel
            (and ``fallback`` is False); the message names each one and the fixes.
        ValueError: a trainable group parameter is not a parameter of ``model``, or is
            in two groups.
        TypeError: a group holds something that is not a tensor.
    """
    columns, num_groups = group_columns(groups)
    owners: Counter[int] = Counter(
        id(p)
        for _, m in model.named_modules(remove_duplicate=False)
        for p in m.parameters(recurse=False)
        if id(p) in columns
    )
    units: dict[nn.Module, Unit] = {}
    unsupported = []
    for path, module in model.named_modules():
        owned = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in columns}
        if not owned:
            continue
        kernel = find_kernel(module)
        extra = sorted(set(owned) - set(kernel.params)) if kernel is not None else []
        if kernel is not None and not extra:
            units[module] = _make_unit(path, module, kernel, owned, columns, owners)
        elif fallback:
            units[module] = _make_unit(path, module, None, owned, columns, owners)
        else:
            detail = f" with extra parameters {extra}" if extra else ""
            unsupported.append(f"'{path}' ({type(module).__name__}{detail})")
    if unsupported:
        raise UnsupportedLayerError(_unsupported_message(unsupported))
    _link_fallbacks(units, columns, owners)
    missing = set(columns) - set(owners)
    if missing:
        shapes = [list(p.shape) for g in groups for p in g if id(p) in missing]
        raise ValueError(
            f"{len(missing)} trainable parameter(s) in `groups` (shapes {shapes}) are not parameters "
            "of `model`: pass the model that uses them."
        )
    return list(units.values()), num_groups
