r"""When to change the batch size, and to what: the one decision rule, a pure function.

The controller (:class:`~noisescale.control.controller.BatchSizeController`) and the schedule export
(:mod:`noisescale.control.export`) both call :func:`decide`; nothing else decides a batch size.

Targets (McCandlish et al. 2018):

- the critical batch, ``B = c B_simple`` (``critical_factor`` c; B_simple stands in for B_noise,
  eq. 2.8-2.9, and for B_crit, section 2.2);
- an exchange rate r between steps and examples, ``B = sqrt(r B_simple)``: minimising
  ``E + r S`` gives ``B = sqrt(r B_crit)`` for a constant batch and ``B(s) = sqrt(r B_noise(s))`` for an
  adaptive one (section 2.3, appendix D; :func:`noisescale.critical.predict.optimal_batch_for_exchange_rate`).

Safe by construction:

- an unresolved estimate (``ci`` None) changes nothing;
- the batch grows only when the LOWER bound of B_simple's interval justifies the new batch, and
  shrinks (only with ``allow_decrease``) only when the UPPER bound says the batch is too large;
- a change is by an integer factor k >= 2 (up: ``B k``; down: ``B / k``), so every batch size is a
  multiple of ``micro_batch_size x world_size`` (the granule) and within ``[min, max]``;
- hysteresis ``h``: the new batch must be at most ``target(low) / (1 + h)`` to grow and at least
  ``target(high) (1 + h)`` to shrink; with the interval and the factor of 2 this leaves a dead band,
  so one estimate never moves the batch twice, or up then down (tested);
- at least ``min_examples_between`` examples since the last change (or the start).

The batch grows to the LARGEST integer multiple of the current one that the lower bound allows
(a run that resolves late at a high B_simple jumps at once), and shrinks to the SMALLEST divisor
that stays above the upper bound's target.

Units: every batch size and example count is in the unit the loss averages over (images, tokens,
observations: "examples" below); the exchange rate is in examples per step.

References:
    McCandlish, Kaplan, Amodei & OpenAI Dota Team (2018), An Empirical Model of Large-Batch
    Training, arXiv:1812.06162, eqs. 2.8-2.12, section 2.3, appendix D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from noisescale.critical.predict import optimal_batch_for_exchange_rate
from noisescale.meter.steps import check_count

__all__ = ["BatchSizePolicy", "ControllerState", "decide", "next_batch_size"]


def _finite_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
        raise ValueError(f"Expected `{name}` to be a positive finite number but got {value!r}")


def _multiple(name: str, value: int, granule: int, why: str) -> None:
    if value % granule:
        below, above = value // granule * granule, (value // granule + 1) * granule
        nearest = f"{above}" if below == 0 else f"{below} or {above}"
        raise ValueError(
            f"`{name}` = {value} examples is not a multiple of {why} = {granule}: every batch is whole "
            f"micro-batches on every rank; use {nearest}"
        )


@dataclass(frozen=True)
class BatchSizePolicy:
    """The controller's settings, validated once (before training).

    Attributes:
        batch_size: the initial global batch size B0, examples (all ranks, all micro-batches).
        micro_batch_size: examples per micro-batch (one backward pass) on one rank; fixed.
        world_size: data-parallel ranks.
        max_batch_size: the largest global batch, examples; None: no limit.
        min_batch_size: the smallest global batch, examples (default: ``batch_size``, or one
            micro-batch per rank with ``allow_decrease``).
        critical_factor: c, to track ``B = c B_simple`` (default 1 unless ``exchange_rate`` is given).
        exchange_rate: r, examples one step is worth, to track ``B = sqrt(r B_simple)`` instead.
        hysteresis: h >= 0, the margin the interval's bound must clear (0.1: 10%).
        min_examples_between: examples since the last change (or the start) before the next one.
        allow_decrease: also shrink the batch (by integer factors); off by default, so the batch
            never decreases.

    Raises:
        ValueError: on any invalid setting, naming it and the fix: counts that are not positive
            integers, batch sizes that are not multiples of ``micro_batch_size x world_size``,
            ``max_batch_size < min_batch_size``, an initial batch outside ``[min, max]``, both
            targets given, a non-finite or non-positive factor or rate, a negative hysteresis.

    Example:
        >>> policy = BatchSizePolicy(batch_size=64, micro_batch_size=32, max_batch_size=1024)
        >>> policy.granule, policy.target_batch_size(500.0)
        (32, 500.0)
        >>> BatchSizePolicy(batch_size=64, micro_batch_size=32, exchange_rate=100.0).target_batch_size(400.0)
        200.0
    """

    batch_size: int
    micro_batch_size: int
    world_size: int = 1
    max_batch_size: int | None = None
    min_batch_size: int | None = None
    critical_factor: float | None = None
    exchange_rate: float | None = None
    hysteresis: float = 0.1
    min_examples_between: int = 0
    allow_decrease: bool = False

    def __post_init__(self) -> None:
        """Validate every setting (see the class)."""
        check_count("micro_batch_size", self.micro_batch_size)
        check_count("world_size", self.world_size, "ranks")
        check_count("batch_size", self.batch_size)
        why = f"micro_batch_size x world_size ({self.micro_batch_size} x {self.world_size})"
        _multiple("batch_size", self.batch_size, self.granule, why)
        if self.min_batch_size is not None:
            check_count("min_batch_size", self.min_batch_size)
            _multiple("min_batch_size", self.min_batch_size, self.granule, why)
        if self.max_batch_size is not None:
            check_count("max_batch_size", self.max_batch_size)
            _multiple("max_batch_size", self.max_batch_size, self.granule, why)
            if self.max_batch_size < self.lowest:
                raise ValueError(
                    f"`max_batch_size` = {self.max_batch_size} is below `min_batch_size` = {self.lowest} "
                    "examples: raise max_batch_size or lower min_batch_size"
                )
        if not self.lowest <= self.batch_size <= (self.max_batch_size or self.batch_size):
            raise ValueError(
                f"the initial `batch_size` = {self.batch_size} must lie in [min_batch_size, max_batch_size]"
                f" = [{self.lowest}, {self.max_batch_size}] examples"
            )
        if self.critical_factor is not None and self.exchange_rate is not None:
            raise ValueError(
                "give one target: `critical_factor` (B = c B_simple) or `exchange_rate` "
                "(B = sqrt(r B_simple)), not both"
            )
        for name in ("critical_factor", "exchange_rate"):
            if getattr(self, name) is not None:
                _finite_positive(name, getattr(self, name))
        if isinstance(self.hysteresis, bool) or not 0.0 <= self.hysteresis < math.inf:
            raise ValueError(
                f"Expected `hysteresis` >= 0 and finite (0.1 is 10%) but got {self.hysteresis!r}"
            )
        if (
            isinstance(self.min_examples_between, bool)
            or not isinstance(self.min_examples_between, int)
            or self.min_examples_between < 0
        ):
            raise ValueError(
                f"Expected `min_examples_between` to be a non-negative integer (examples) but got "
                f"{self.min_examples_between!r}"
            )
        if not isinstance(self.allow_decrease, bool):
            raise ValueError(f"Expected `allow_decrease` to be a bool but got {self.allow_decrease!r}")

    @property
    def granule(self) -> int:
        """``micro_batch_size x world_size``: every global batch is a multiple of it."""
        return self.micro_batch_size * self.world_size

    @property
    def lowest(self) -> int:
        """The smallest batch allowed: ``min_batch_size``, else B0 (or one granule with decreases)."""
        if self.min_batch_size is not None:
            return self.min_batch_size
        return self.granule if self.allow_decrease else self.batch_size

    def target_batch_size(self, b_simple: float) -> float:
        """The batch to track at this B_simple, examples: ``c B_simple`` or ``sqrt(r B_simple)``.

        Args:
            b_simple: a positive B_simple (or a bound of its interval), examples.
        """
        if self.exchange_rate is not None:
            return optimal_batch_for_exchange_rate(self.exchange_rate, b_simple)
        return (1.0 if self.critical_factor is None else self.critical_factor) * b_simple


class ControllerState(NamedTuple):
    """Everything a decision depends on besides the policy and the estimate (identical on every rank).

    Saved by the controller's ``state_dict``; a resumed run continues from it.
    """

    batch_size: int  # the global batch decided, examples
    steps: int  # optimizer steps done
    examples: int  # examples seen (all ranks)
    last_change: int  # examples seen at the last change (0: the start)

    @classmethod
    def initial(cls, policy: BatchSizePolicy) -> ControllerState:
        """Before the first step: B0, nothing seen."""
        return cls(batch_size=policy.batch_size, steps=0, examples=0, last_change=0)


def _divisors(n: int) -> list[int]:
    """Every divisor of n >= 1, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _grown(policy: BatchSizePolicy, batch: int, low: float) -> int:
    """The largest ``batch x k`` (k >= 2) within ``target(low) / (1 + h)`` and the maximum, else ``batch``."""
    if low <= 0.0:  # the interval reaches zero: nothing justifies a larger batch
        return batch
    limit = policy.target_batch_size(low) / (1.0 + policy.hysteresis)
    if policy.max_batch_size is not None:
        limit = min(limit, policy.max_batch_size)
    k = math.floor(limit / batch)
    return batch * k if k >= 2 else batch


def _shrunk(policy: BatchSizePolicy, batch: int, high: float) -> int:
    """The smallest ``batch / k`` (k >= 2, whole granules) above ``target(high) (1 + h)`` and the minimum."""
    floor = max(float(policy.lowest), policy.target_batch_size(high) * (1.0 + policy.hysteresis))
    best = batch
    for k in _divisors(batch // policy.granule)[1:]:  # batch / k stays whole granules iff k divides them
        if batch // k < floor:
            break
        best = batch // k
    return best


def next_batch_size(policy: BatchSizePolicy, batch_size: int, ci: tuple[float, float] | None) -> int:
    """The batch that B_simple's interval justifies now, ignoring the spacing between changes.

    Args:
        policy: the settings.
        batch_size: the current global batch, examples (a multiple of the granule).
        ci: B_simple's interval ``(low, high)``, examples; None when the estimate is not resolved.

    Returns:
        ``batch_size`` (no change), an integer multiple of it, or (``allow_decrease``) a divisor.

    Raises:
        ValueError: if ``ci`` is not finite with ``low <= high`` and ``high > 0`` (a resolved
            estimate's interval always is).

    Examples:
        >>> policy = BatchSizePolicy(batch_size=32, micro_batch_size=32, max_batch_size=1024, hysteresis=0.0)
        >>> next_batch_size(policy, 32, None), next_batch_size(policy, 32, (50.0, 900.0))
        (32, 32)
        >>> next_batch_size(policy, 32, (100.0, 900.0)), next_batch_size(policy, 32, (5000.0, 9000.0))
        (96, 1024)
    """
    if ci is None:
        return batch_size
    low, high = ci
    if not (math.isfinite(low) and math.isfinite(high) and low <= high and high > 0.0):
        raise ValueError(
            f"B_simple's interval {ci} is not a resolved estimate's (finite, low <= high, high > 0)"
        )
    grown = _grown(policy, batch_size, low)
    if grown != batch_size or not policy.allow_decrease:
        return grown
    return _shrunk(policy, batch_size, high)


def decide(
    policy: BatchSizePolicy, state: ControllerState, ci: tuple[float, float] | None
) -> ControllerState:
    """The state after a look at the estimate: the batch changed or not.

    A pure function of its arguments: every DDP rank, given the same estimate (the meter's is the
    same on every rank), and a resumed run, given the saved state, decide the same.

    Args:
        policy: the settings.
        state: the current state (``examples`` already counts the last step).
        ci: B_simple's interval, examples, or None when not resolved (then nothing changes).

    Returns:
        ``state`` itself, or a copy with the new ``batch_size`` and ``last_change = examples``.

    Example:
        >>> policy = BatchSizePolicy(batch_size=32, micro_batch_size=32, min_examples_between=1000)
        >>> state = ControllerState(batch_size=32, steps=10, examples=320, last_change=0)
        >>> decide(policy, state, (400.0, 600.0)) is state                 # too soon after the start
        True
        >>> decide(policy, state._replace(steps=40, examples=1280), (400.0, 600.0)).batch_size
        352
    """
    if state.examples - state.last_change < policy.min_examples_between:
        return state
    batch = next_batch_size(policy, state.batch_size, ci)
    if batch == state.batch_size:
        return state
    return state._replace(batch_size=batch, last_change=state.examples)
