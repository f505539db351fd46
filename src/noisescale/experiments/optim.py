r"""The optimizer of a built-in run: plain SGD or AdamW, after a linear learning-rate warmup.

- ``"sgd"``: ``torch.optim.SGD`` (``momentum`` 0 is the optimizer of McCandlish et al.'s analysis).
- ``"adamw"``: ``torch.optim.AdamW`` (Loshchilov & Hutter 2019) with ``betas``; weight decay on
  the matrices only (weights of linear layers and embeddings), not on biases or normalisation
  gains, as nanoGPT does.

Either way the learning rate of step ``s`` (0-based) is ``lr * min(1, (s + 1) / warmup_steps)``
(:func:`warmup_factor`; constant after the warmup): a sweep compares batch sizes at their best
constant learning rate, as the paper does (appendix A.3).

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162, appendix A.3.
    Loshchilov & Hutter (2019), Decoupled Weight Decay Regularization, ICLR (AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "check_optimizer", "make_optimizer", "warmup_factor"]

OPTIMIZERS = ("sgd", "adamw")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The multiplier of the learning rate at step ``step`` (0-based): a linear warmup, then 1.

    Args:
        step: optimizer steps done before this one.
        warmup_steps: steps of the warmup (0: none).

    Returns:
        ``min(1, (step + 1) / warmup_steps)``, or 1 without a warmup.

    Example:
        >>> [warmup_factor(s, 4) for s in (0, 1, 3, 10)], warmup_factor(0, 0)
        ([0.25, 0.5, 1.0, 1.0], 1.0)
    """
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def check_optimizer(
    name: str, *, momentum: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int
) -> None:
    """Validate the optimizer settings of a run; the messages say what to change.

    Raises:
        ValueError: on an unknown optimizer, momentum with AdamW, a negative weight decay or
            warmup, or betas outside [0, 1).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if name == "adamw" and momentum:
        raise ValueError("momentum is an SGD setting: AdamW's first moment is betas[0]")
    if not (0 <= weight_decay < math.inf and warmup_steps >= 0):
        raise ValueError(
            f"expected weight_decay >= 0 and warmup_steps >= 0 but got {weight_decay} and {warmup_steps}"
        )
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"expected two betas in [0, 1) but got {betas}")


def make_optimizer(
    params: Iterable[nn.Parameter],
    name: str,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_steps: int = 0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and its warmup schedule (call ``scheduler.step()`` after each ``optimizer.step()``).

    Args:
        params: the trainable parameters.
        name: ``"sgd"`` or ``"adamw"``.
        lr: the learning rate after the warmup.
        momentum: SGD momentum.
        weight_decay: SGD's L2 penalty on every parameter, or AdamW's decoupled decay on the
            matrices (parameters of two or more dimensions).
        betas: AdamW's moment decays.
        warmup_steps: steps of the linear warmup (:func:`warmup_factor`).

    Returns:
        ``(optimizer, scheduler)``; the optimizer's ``param_groups[0]["lr"]`` is the step's rate.

    Raises:
        ValueError: on invalid settings (:func:`check_optimizer`).

    Example:
        >>> opt, sched = make_optimizer(nn.Linear(2, 1).parameters(), "adamw", lr=1e-3, warmup_steps=10)
        >>> type(opt).__name__, opt.param_groups[0]["lr"]
        ('AdamW', 0.0001)
    """
    check_optimizer(
        name, momentum=momentum, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps
    )
    params = [p for p in params if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "name": "matrices"},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "name": "vectors"},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup_steps))
    return optimizer, scheduler
