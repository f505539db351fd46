"""The meter's settings that travel through the library, the CLI and the sweeps: one definition each.

- :data:`Method` and :func:`parse_method`: the estimator's name, with one parser for every
  spelling (``per-example`` on the command line, ``per_example`` in Python).
- :class:`Averaging`: how the meter averages its per-step estimates, either a per-step decay
  or a time constant in examples, validated once.

Example:
    >>> parse_method("per-example")
    'per_example'
    >>> Averaging.of(ema_examples=1000.0).decay(examples=100.0) == math.exp(-0.1)
    True
    >>> Averaging.of().ema_decay
    0.99
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "DEFAULT_EMA_DECAY",
    "METHODS",
    "SINGLE_PROCESS_METHODS",
    "Averaging",
    "Method",
    "parse_method",
]

Method = Literal["per_example", "microbatch", "ddp", "fsdp"]
"""``per_example``: exact per-example norms from layer hooks; ``microbatch``: k-way estimator over
the backward passes of a step; ``ddp``: the k-way estimator over every rank's micro-batches;
``fsdp``: the same over a ``fully_shard`` model's ranks (:mod:`noisescale.fsdp`)."""

METHODS: tuple[Method, ...] = get_args(Method)
SINGLE_PROCESS_METHODS: tuple[Method, ...] = ("per_example", "microbatch")  # what one process can run

DEFAULT_EMA_DECAY = 0.99  # per step: an average over about 100 steps


def parse_method(method: str, allowed: tuple[Method, ...] = METHODS) -> Method:
    """The canonical method name: ``"per-example"``, ``"Per_Example"`` give ``"per_example"``.

    Args:
        method: a method name, with ``-`` or ``_``, any case.
        allowed: the methods the caller accepts (default: all of :data:`METHODS`).

    Raises:
        ValueError: if the method is unknown or not in ``allowed``; the message lists them.
    """
    canonical = str(method).strip().lower().replace("-", "_")
    for m in allowed:
        if canonical == m:
            return m
    spelled = ", ".join(repr(m.replace("_", "-")) for m in allowed)
    raise ValueError(f"Expected `method` to be one of {spelled} but got {method!r}")


@dataclass(frozen=True)
class Averaging:
    """How the meter averages per-step |G|^2 and tr(Sigma): exactly one of two forms.

    Attributes:
        ema_decay: per-step decay of the exponential averages, in [0, 1] (1.0: plain mean).
        ema_examples: instead, a time constant in examples (the unit the loss is averaged over):
            decay ``exp(-B / ema_examples)`` per step of B examples, so that runs at different
            batch sizes average over the same data (AdaptDL uses ``0.999 ** (B / B0)``).
    """

    ema_decay: float | None = DEFAULT_EMA_DECAY
    ema_examples: float | None = None

    def __post_init__(self) -> None:
        """Validate: exactly one form, in range.

        Raises:
            ValueError: if both or neither are given, ``ema_decay`` is outside [0, 1] or
                ``ema_examples`` is not positive and finite.
        """
        if (self.ema_decay is None) == (self.ema_examples is None):
            raise ValueError("give exactly one of `ema_decay` (per step) and `ema_examples` (examples)")
        if self.ema_examples is not None and not 0.0 < self.ema_examples < math.inf:
            raise ValueError(f"Expected `ema_examples` > 0 (examples) but got {self.ema_examples}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"Expected `ema_decay` in [0, 1] but got {self.ema_decay}")

    @classmethod
    def of(cls, ema_decay: float | None = None, ema_examples: float | None = None) -> Averaging:
        """The averaging the user asked for; neither given means the default per-step decay.

        Raises:
            ValueError: as the constructor.
        """
        if ema_decay is None and ema_examples is None:
            return cls()
        return cls(ema_decay=ema_decay, ema_examples=ema_examples)

    def decay(self, *, examples: float) -> float:
        """The decay of one step that saw ``examples`` examples."""
        if self.ema_examples is not None:
            return math.exp(-examples / self.ema_examples)
        assert self.ema_decay is not None
        return self.ema_decay
