r"""How the optimizer follows the batch: one rule per optimizer family, each with its source.

When the global batch changes from B to ``B' = kappa B``, a rule rescales every parameter group
of a torch optimizer (and the base learning rates of its LR schedulers, so a schedule keeps
multiplying the rescaled value):

- :class:`SGDRule` (McCandlish et al. 2018, eq. 2.6): the learning rate follows
  ``eps_opt(B) = eps_max / (1 + B_noise / B)`` with B_simple standing in for B_noise, i.e. it is
  multiplied by ``(1 + B_simple / B) / (1 + B_simple / B')``: about ``kappa`` (linear scaling) while
  ``B << B_simple``, about 1 far above it, and never more than linear scaling (a factor between 1
  and ``kappa`` for a growth, between ``kappa`` and 1 for a decrease). Momentum and weight decay are
  left as they are.
- :class:`AdamRule` (Malladi et al. 2022, the square-root scaling rule for Adam/RMSProp SDEs):
  ``lr -> lr sqrt(kappa)``, ``beta_i -> 1 - kappa (1 - beta_i)``, ``eps -> eps / sqrt(kappa)``; and for
  decoupled weight decay (AdamW) ``lambda -> lambda kappa / (lr factor)``, which keeps the AdamW
  timescale ``tau = B / (eta lambda D)`` (D the dataset size) constant. Each part can be switched off.
  The betas rule needs ``kappa (1 - beta) < 1`` (``beta1 = 0.9`` allows a total growth below 10x):
  :meth:`AdamRule.check` refuses a policy whose largest batch would break it, before training.

References:
    McCandlish, Kaplan, Amodei & OpenAI Dota Team (2018), arXiv:1812.06162, eq. 2.6.
    Malladi, Lyu, Panigrahi & Arora (2022), On the SDEs and Scaling Rules for Adaptive Gradient
    Algorithms, NeurIPS, arXiv:2205.10287 (definition of the square-root scaling rule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from noisescale.critical.predict import learning_rate_at

__all__ = ["AdamRule", "OptimizerRule", "SGDRule", "apply_rule", "check_rule"]


class OptimizerRule(Protocol):
    """What :func:`apply_rule` needs of a rule."""

    @property
    def max_lr(self) -> float | None:
        """The base learning rate never rises above this (None: no cap)."""
        ...

    def lr_factor(self, old: int, new: int, b_simple: float) -> float:
        """The learning rate's factor for a change from ``old`` to ``new`` examples per step."""
        ...

    def adjust(self, group: MutableMapping[str, Any], kappa: float, lr_factor: float) -> None:
        """Rescale the group's other hyperparameters (betas, eps, weight decay) in place."""
        ...


@dataclass(frozen=True)
class SGDRule:
    r"""SGD: the learning rate follows eps_opt(B) of eq. 2.6, B_simple standing in for B_noise.

    .. math::

        \frac{\epsilon_{opt}(B')}{\epsilon_{opt}(B)} = \frac{1 + B_{simple}/B}{1 + B_{simple}/B'}

    Attributes:
        max_lr: eps_max of eq. 2.6, if known (e.g. the largest stable rate): the base learning
            rate is never raised above it. B_simple overestimates B_noise when the Hessian is far
            from isotropic (eq. 2.8-2.9), and the ratio then scales nearly linearly; the cap keeps
            the rate below the edge of stability. None: no cap.

    Example:
        >>> SGDRule().lr_factor(32, 64, b_simple=1e-9)        # far above B_simple: flat
        1.0000000000156248
        >>> round(SGDRule().lr_factor(32, 64, b_simple=1e9), 6)  # far below: linear
        2.0
        >>> SGDRule().lr_factor(100, 200, b_simple=100.0)       # (1 + 1) / (1 + 0.5)
        1.3333333333333333

    References:
        McCandlish et al. (2018), arXiv:1812.06162, eq. 2.6.
    """

    max_lr: float | None = None

    def __post_init__(self) -> None:
        _check_max_lr(self.max_lr)

    def lr_factor(self, old: int, new: int, b_simple: float) -> float:
        """``eps_opt(new) / eps_opt(old)`` of eq. 2.6, between 1 and ``new/old`` (linear scaling)."""
        return learning_rate_at(new, 1.0, b_simple) / learning_rate_at(old, 1.0, b_simple)

    def adjust(self, group: MutableMapping[str, Any], kappa: float, lr_factor: float) -> None:
        """Nothing besides the learning rate."""


@dataclass(frozen=True)
class AdamRule:
    """Adam/AdamW: Malladi et al.'s square-root rule, and AdamW's weight-decay timescale kept.

    Attributes:
        lr: scale the learning rate by ``sqrt(kappa)``.
        betas: ``beta_i -> 1 - kappa (1 - beta_i)``.
        eps: ``eps -> eps / sqrt(kappa)``.
        weight_decay: for decoupled weight decay (``torch.optim.AdamW``, or a group with
            ``decoupled_weight_decay``), ``lambda -> lambda kappa / lr_factor`` so that
            ``B / (eta lambda D)`` stays constant; coupled (L2) weight decay is left alone.
        max_lr: the base learning rate is never raised above it (None: no cap).

    Example:
        >>> group = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1,
        ...          "decoupled_weight_decay": True}
        >>> apply_rule(AdamRule(), [group], old=32, new=128, b_simple=500.0)
        2.0
        >>> group["lr"], [round(b, 12) for b in group["betas"]], group["eps"], group["weight_decay"]
        (0.002, [0.6, 0.96], 5e-09, 0.2)

    References:
        Malladi et al. (2022), arXiv:2205.10287. AdamW timescale: SCIENCE.md ("Changing the batch by
        kappa mid-run"); Loshchilov & Hutter (2019), Decoupled Weight Decay Regularization.
    """

    lr: bool = True
    betas: bool = True
    eps: bool = True
    weight_decay: bool = True
    max_lr: float | None = None

    def __post_init__(self) -> None:
        _check_max_lr(self.max_lr)

    def lr_factor(self, old: int, new: int, b_simple: float) -> float:
        """``sqrt(new/old)``, or 1 with ``lr=False``."""
        return math.sqrt(new / old) if self.lr else 1.0

    def adjust(self, group: MutableMapping[str, Any], kappa: float, lr_factor: float) -> None:
        """Betas, eps and decoupled weight decay (see the class)."""
        if self.betas and "betas" in group:
            group["betas"] = tuple(_scaled_beta(float(b), kappa) for b in group["betas"])
        if self.eps and "eps" in group:
            group["eps"] = group["eps"] / math.sqrt(kappa)
        if self.weight_decay and group.get("decoupled_weight_decay", False) and group.get("weight_decay"):
            group["weight_decay"] = group["weight_decay"] * kappa / lr_factor

    def check(self, optimizer: torch.optim.Optimizer, growth: float) -> None:
        """Refuse, before training, a total growth that would push a beta outside [0, 1).

        Args:
            optimizer: its param groups' betas at the initial batch.
            growth: the largest total factor ``max_batch_size / batch_size``, or inf when unbounded.

        Raises:
            ValueError: naming the beta, the largest growth it allows and the fixes.
        """
        if not self.betas:
            return
        for i, group in enumerate(optimizer.param_groups):
            for j, beta in enumerate(group.get("betas", ())):
                allowed = math.inf if float(beta) >= 1.0 else 1.0 / (1.0 - float(beta))
                if growth > allowed:
                    raise ValueError(
                        f"the square-root rule maps beta{j + 1} = {float(beta)} of param group {i} to "
                        f"1 - kappa (1 - beta), below 0 for a total growth kappa > {allowed:.4g}, and this "
                        f"policy allows {growth:.4g}: set max_batch_size to at most {allowed:.4g} x "
                        "batch_size, or use AdamRule(betas=False)"
                    )


def _check_max_lr(max_lr: float | None) -> None:
    """Refuse a cap that is not a positive finite learning rate (it would be ignored silently).

    Raises:
        ValueError: naming the value and the fix.
    """
    if max_lr is not None and not (isinstance(max_lr, int | float) and math.isfinite(max_lr) and max_lr > 0):
        raise ValueError(
            f"Expected `max_lr` to be a positive finite learning rate (the cap) or None (no cap) but "
            f"got {max_lr!r}"
        )


def _scaled_beta(beta: float, kappa: float) -> float:
    """``1 - kappa (1 - beta)`` (Malladi et al. 2022), refused below 0.

    Raises:
        ValueError: if the scaled beta is negative (the total growth is too large for this beta).
    """
    scaled = 1.0 - kappa * (1.0 - beta)
    if scaled < 0.0:
        raise ValueError(
            f"the square-root rule would map beta = {beta} to {scaled} for kappa = {kappa}: use "
            "AdamRule(betas=False) or a smaller max_batch_size"
        )
    return scaled


def apply_rule(
    rule: OptimizerRule,
    param_groups: Iterable[MutableMapping[str, Any]],
    *,
    old: int,
    new: int,
    b_simple: float,
    schedulers: Iterable[Any] = (),
) -> float:
    """Rescale every param group (and each scheduler's base learning rates) for a batch change.

    The learning rate is multiplied in ``lr`` and, when present, in ``initial_lr`` (the base value
    PyTorch's LR schedulers keep in the group); each scheduler's ``base_lrs`` likewise (one per
    group), so that a schedule keeps multiplying the rescaled base. With the rule's ``max_lr`` a
    group's factor is lowered so that its base rate (``initial_lr``, else ``lr``) stays at most
    ``max_lr``.

    Args:
        rule: :class:`SGDRule`, :class:`AdamRule` or your own :class:`OptimizerRule`.
        param_groups: ``optimizer.param_groups``.
        old: the batch before, examples.
        new: the batch after, examples.
        b_simple: B_simple at the decision, examples (used by :class:`SGDRule`).
        schedulers: ``torch.optim.lr_scheduler`` objects on this optimizer.

    Returns:
        The learning rate's factor (of the first group).

    Raises:
        ValueError: if the rule refuses the change (:class:`AdamRule`: a beta would fall below 0);
            then nothing is changed.
    """
    kappa = new / old
    groups = list(param_groups)
    updated, factors = [], []
    for group in groups:  # every new value first, so that a refused one changes nothing
        factor = rule.lr_factor(old, new, b_simple)
        base = float(group.get("initial_lr", group["lr"]))
        if rule.max_lr is not None and base > 0:  # raised at most to max_lr; a decrease is never held back
            factor = min(factor, max(rule.max_lr / base, 1.0))
        values = {key: value for key, value in group.items() if key != "params"}
        values["lr"] = values["lr"] * factor
        if "initial_lr" in values:
            values["initial_lr"] = values["initial_lr"] * factor
        rule.adjust(values, kappa, factor)
        updated.append(values)
        factors.append(factor)
    for group, values in zip(groups, updated, strict=True):
        group.update(values)
    for scheduler in schedulers:
        scheduler.base_lrs = [lr * f for lr, f in zip(scheduler.base_lrs, factors, strict=True)]
    return factors[0]


def check_rule(
    rule: OptimizerRule, optimizer: torch.optim.Optimizer, *, batch_size: int, max_batch_size: int | None
) -> None:
    """Refuse, before training, a rule the policy's largest batch would break (:meth:`AdamRule.check`).

    Args:
        rule: the rule to apply at each change.
        optimizer: at the initial batch.
        batch_size: the initial batch, examples.
        max_batch_size: the largest, or None (unbounded).

    Raises:
        ValueError: from :meth:`AdamRule.check`.
    """
    if isinstance(rule, AdamRule):
        rule.check(optimizer, math.inf if max_batch_size is None else max_batch_size / batch_size)
