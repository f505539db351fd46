r"""Learning-rate schedules keyed by examples seen, so that they survive batch-size changes.

A schedule written in optimizer steps (warmup over 1,000 steps, cosine over 50,000) silently
changes meaning when the batch grows: the warmup ends later in examples, the decay too (a known
failure of batch ramps, Megatron-Bridge #2609). Keyed by examples (or tokens) seen, it does not.

- :class:`WarmupCosine` and :class:`WarmupStableDecay`: multipliers of the base learning rate as
  functions of examples seen, for ``torch.optim.lr_scheduler.LambdaLR``.
- :func:`key_by_examples`: re-keys the multipliers of an existing ``LambdaLR`` (yours, or the one
  the Hugging Face Trainer built with ``get_scheduler``) by examples seen: a multiplier written in
  steps at ``examples_per_step`` examples each is evaluated at ``examples_seen / examples_per_step``.

The base learning rates stay the scheduler's ``base_lrs``: the rules of
:mod:`noisescale.control.rules` rescale them at a batch change, and the schedule keeps multiplying.

Phases (x = examples seen):

1. warmup: ``x / warmup``, linear from 0 to 1;
2. WarmupCosine: ``final + (1 - final) (1 + cos(pi p)) / 2`` with ``p = (x - warmup)/(total - warmup)``;
   WarmupStableDecay: 1 until ``total - decay``, then linear to ``final`` at ``total``;
3. after ``total``: ``final``.

References:
    Loshchilov & Hutter (2017), SGDR, arXiv:1608.03983 (cosine). Hu et al. (2024), MiniCPM,
    arXiv:2404.06395 (warmup-stable-decay).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine", "WarmupStableDecay", "key_by_examples"]


def _check(warmup: float, total: float, final: float, decay: float = 0.0) -> None:
    """Raise unless ``0 <= warmup``, ``warmup + decay <= total``, all finite, ``0 <= final <= 1``."""
    values = (warmup, total, final, decay)
    if not all(math.isfinite(v) for v in values) or min(values) < 0.0 or total <= 0.0:
        raise ValueError(
            f"Expected finite, non-negative warmup, decay, final and a positive total, got {values}"
        )
    if warmup + decay > total:
        raise ValueError(f"warmup ({warmup}) + decay ({decay}) exceeds total ({total}) examples")
    if final > 1.0:
        raise ValueError(f"Expected `final` in [0, 1] (a multiplier of the base lr) but got {final}")


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup, then a cosine from 1 to ``final``, keyed by examples seen.

    Attributes:
        warmup: examples of the linear warmup.
        total: examples at the end of the cosine.
        final: the multiplier from ``total`` on.

    Raises:
        ValueError: if a value is negative or non-finite, ``warmup > total`` or ``final > 1``.

    Example:
        >>> schedule = WarmupCosine(warmup=100, total=1100, final=0.1)
        >>> [round(schedule(x), 4) for x in (0, 50, 100, 600, 1100, 5000)]
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """

    warmup: float
    total: float
    final: float = 0.0

    def __post_init__(self) -> None:
        """Validate (see the class)."""
        _check(self.warmup, self.total, self.final)

    def __call__(self, examples: float) -> float:
        """The multiplier after ``examples`` examples."""
        if examples < self.warmup:
            return examples / self.warmup
        if examples >= self.total:
            return self.final
        progress = (examples - self.warmup) / (self.total - self.warmup)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupStableDecay:
    """Linear warmup, a constant stage, then a linear decay to ``final`` over the last ``decay`` examples.

    Attributes:
        warmup: examples of the linear warmup.
        total: examples at the end of the decay.
        decay: examples of the decay stage, ending at ``total``.
        final: the multiplier from ``total`` on.

    Raises:
        ValueError: if a value is negative or non-finite, ``warmup + decay > total`` or ``final > 1``.

    Example:
        >>> schedule = WarmupStableDecay(warmup=100, total=1000, decay=200)
        >>> [schedule(x) for x in (50, 100, 800, 900, 1000)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """

    warmup: float
    total: float
    decay: float
    final: float = 0.0

    def __post_init__(self) -> None:
        """Validate (see the class)."""
        _check(self.warmup, self.total, self.final, self.decay)

    def __call__(self, examples: float) -> float:
        """The multiplier after ``examples`` examples."""
        if examples < self.warmup:
            return examples / self.warmup
        if examples >= self.total:
            return self.final
        start = self.total - self.decay
        if examples < start:
            return 1.0
        return 1.0 - (1.0 - self.final) * (examples - start) / self.decay


def key_by_examples(
    scheduler: LambdaLR, examples: Callable[[], float], *, examples_per_step: float = 1.0
) -> LambdaLR:
    """Make a ``LambdaLR`` follow examples seen instead of its step count, in place.

    Each multiplier ``f`` becomes ``step -> f(examples() / examples_per_step)``: with
    ``examples_per_step=1`` (the default) ``f`` is a function of examples (:class:`WarmupCosine`);
    with the initial batch size, a schedule written in steps at that batch (the Hugging Face
    Trainer's) keeps its shape in examples whatever the batch becomes. Call ``scheduler.step()``
    after the examples of the step are counted (after ``controller.step()``); the new multipliers
    apply from the next ``scheduler.step()``. The wrapped multipliers are not saved in
    ``scheduler.state_dict()`` (as for any function): after a resume, wrap the new scheduler again.

    Args:
        scheduler: a ``torch.optim.lr_scheduler.LambdaLR``.
        examples: returns the examples seen so far (e.g. ``lambda: controller.examples``).
        examples_per_step: the examples one step of the original multipliers stands for.

    Returns:
        ``scheduler``, re-keyed.

    Raises:
        TypeError: if ``scheduler`` is not a ``LambdaLR``.
        ValueError: if ``examples_per_step`` is not positive and finite.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> seen = [0]
        >>> sched = key_by_examples(torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(100, 1000)),
        ...                         lambda: seen[0])
        >>> seen[0] = 50; opt.step(); sched.step(); opt.param_groups[0]["lr"]
        0.5
    """
    if not isinstance(scheduler, LambdaLR):
        raise TypeError(
            f"key_by_examples re-keys a torch.optim.lr_scheduler.LambdaLR (the Hugging Face Trainer's "
            f"schedulers are), not a {type(scheduler).__name__}: write the schedule as a LambdaLR multiplier"
        )
    if not 0.0 < examples_per_step < math.inf:
        raise ValueError(f"Expected `examples_per_step` > 0 and finite but got {examples_per_step}")

    def keyed(multiplier: Callable[..., float]) -> Callable[[int], float]:
        def by_examples(step: int) -> float:
            del step  # the schedule follows examples seen, not steps
            return multiplier(examples() / examples_per_step)

        return by_examples

    scheduler.lr_lambdas = [keyed(f) for f in scheduler.lr_lambdas]
    return scheduler
