"""Which parameters the meter measures, and how its reported series sum them.

The meter reports one estimate per named group (default: one per module), one per
optimizer parameter group, and the total. All three are sums of *cells*, the
intersections module group x optimizer group: per-step |G|^2 and tr(Sigma) are additive
over disjoint parameter sets, so each series is a 0/1 row over the cells and the totals
are mediants (``sum tr Sigma_j / sum |G_j|^2``, SCIENCE.md).

A tensor is measured once. Listed twice in one group it is counted once (a group is a
set of tensors); listed in two groups (e.g. a tied embedding and output head named as two
groups) it is refused: which group's |G|^2 its gradient belongs to is ambiguous, and
counting it in both would double its |G|^2 in the total.

Shape letters: ``C`` cells, ``S`` series (groups, then optimizer groups, then the total).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from noisescale.errors import ParameterGroupError

__all__ = ["Partition", "default_groups", "layernorm_groups", "partition"]

NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)


def default_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters grouped by the module that owns them (tied ones: first owner).

    Args:
        model: the module (unwrapped from DDP).

    Returns:
        ``{module name (``"model"`` for the root): [parameters]}``, in module order.

    Example:
        >>> list(default_groups(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))))
        ['0', '2']
    """
    groups: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                groups.setdefault(name or "model", []).append(p)
    return groups


def layernorm_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The groups of the cheap transformer mode: the trainable parameters of every LayerNorm and RMSNorm.

    Pass them as ``GradientNoiseScale(model, groups=layernorm_groups(model))``: the meter then
    hooks these layers and their parameters only (no other layer gets a hook, no other gradient is
    read), and B_simple is that of the normalisation layers, ``sum tr Sigma_j / sum |G_j|^2`` over
    them. Gray et al. (2024) found that it predicts the whole model's B_simple in transformers, at
    almost no cost; ``noisescale measure --only layernorm`` reports how closely on ``shakespeare``.

    Args:
        model: the module (unwrapped from DDP).

    Returns:
        ``{module name: [its trainable parameters]}`` for every ``nn.LayerNorm`` and ``nn.RMSNorm``,
        in module order (the same names as :func:`default_groups`).

    Raises:
        ParameterGroupError: if the model has no normalisation layer with a trainable parameter.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 1))
        >>> {name: len(ps) for name, ps in layernorm_groups(model).items()}
        {'1': 2}

    References:
        Gray et al. (2024), Normalization Layer Per-Example Gradients are Sufficient to Predict
        Gradient Noise Scale in Transformers, arXiv:2411.00999.
    """
    groups = {
        name or "model": [p for p in m.parameters(recurse=False) if p.requires_grad]
        for name, m in model.named_modules()
        if isinstance(m, NORM_LAYERS)
    }
    groups = {name: ps for name, ps in groups.items() if ps}
    if not groups:
        raise ParameterGroupError(
            "the model has no nn.LayerNorm or nn.RMSNorm with trainable parameters: the LayerNorm-only mode "
            "has nothing to measure (measure every parameter instead)"
        )
    return groups


class Partition(NamedTuple):
    """Cells (module group x optimizer parameter group) and how the series sum them."""

    cells: list[list[nn.Parameter]]  # the C cells, each a list of distinct parameters
    series: torch.Tensor  # [S, C] float64 0/1: rows = groups, then param groups, then the total
    group_names: list[str]
    param_group_names: list[str]


def _parameter_names(model: nn.Module | None) -> dict[int, str]:
    """``id(p) -> "a.weight = b.weight"``: every name of each parameter (tied ones have several)."""
    names: dict[int, list[str]] = {}
    if model is not None:
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
    return {k: " = ".join(v) for k, v in names.items()}


def measured_groups(
    groups: Mapping[str, Iterable[nn.Parameter]], model: nn.Module | None = None
) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of each group, each tensor once; groups left empty dropped.

    Args:
        groups: ``{name: parameters}`` as the user gave them.
        model: to name a parameter in the error (optional).

    Returns:
        ``{name: [distinct trainable parameters]}``.

    Raises:
        ParameterGroupError: if one tensor is in two groups (tied weights listed twice), or no
            group has a trainable parameter.
    """
    owner: dict[int, str] = {}
    named: dict[str, list[nn.Parameter]] = {}
    names: dict[int, str] | None = None
    for group, params in groups.items():
        kept: list[nn.Parameter] = []
        for p in params:
            if not p.requires_grad:
                continue
            first = owner.setdefault(id(p), group)
            if first != group:
                names = _parameter_names(model) if names is None else names
                label = names.get(id(p), f"of shape {list(p.shape)}")
                raise ParameterGroupError(
                    f"parameter {label} is in two groups, {first!r} and {group!r} (tied weights are one "
                    "tensor): its gradient would be counted twice in the total. List it in one group only."
                )
            if all(q is not p for q in kept):
                kept.append(p)
        if kept:
            named[group] = kept
    if not named:
        raise ParameterGroupError("the model has no parameter with requires_grad=True: nothing to measure")
    return named


def partition(
    named: Mapping[str, list[nn.Parameter]], optimizer: torch.optim.Optimizer | None = None
) -> Partition:
    """Split the measured parameters into cells; per-step estimates are additive over them.

    Args:
        named: ``{group: distinct parameters}`` from :func:`measured_groups`.
        optimizer: also one series per optimizer parameter group (named by its ``"name"``
            key, else ``param_group_<i>``); parameters it does not hold count in the total only.

    Returns:
        The :class:`Partition`.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "name": "bias"}])
        >>> part = partition({"model": [model.weight, model.bias]}, opt)
        >>> part.series.tolist(), part.param_group_names
        ([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], ['param_group_0', 'bias'])
    """
    owner: dict[int, int] = {}
    pg_names: list[str] = []
    if optimizer is not None:
        for i, group in enumerate(optimizer.param_groups):
            pg_names.append(str(group.get("name", f"param_group_{i}")))
            for p in group["params"]:
                owner.setdefault(id(p), i)
    cells: dict[tuple[int, int], list[nn.Parameter]] = {}
    for j, params in enumerate(named.values()):
        for p in params:
            cells.setdefault((j, owner.get(id(p), -1)), []).append(p)
    keys = list(cells)
    rows = [[float(key[0] == j) for key in keys] for j in range(len(named))]
    rows += [[float(key[1] == i) for key in keys] for i in range(len(pg_names))]
    rows.append([1.0] * len(keys))
    series = torch.tensor(rows, dtype=torch.float64)
    return Partition([cells[k] for k in keys], series, list(named), pg_names)
