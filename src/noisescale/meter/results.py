"""What :meth:`GradientNoiseScale.compute` returns, and the rule that makes a number of it.

"None unless resolved" lives here, in :func:`group_estimate`, and nowhere else: B_simple,
its interval and its standard error are numbers only when the noise scale is resolved,
that is when

- the averaged |G|^2 is significantly positive (Fieller's interval is bounded),
- the averaged tr(Sigma) is positive, and
- the records never contradicted "the big batch is the (weighted) mean of the small
  ones" (:data:`noisescale.estimators.COEFFICIENT_ROWS`): a step whose big-batch squared
  norm exceeds the weighted mean of the small ones' is impossible, and so is a tr(Sigma)
  significantly negative. Either sets ``contradiction`` to a message that says what to
  check; the estimate is then never resolved until :meth:`GradientNoiseScale.reset`.

Units: ``b_simple`` and its interval are in examples (the unit the loss is averaged over:
images, tokens, observations); |G|^2 and tr(Sigma) in squared loss units per squared
parameter unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from noisescale._format import describe_b_simple
from noisescale.uncertainty import BSimpleInterval

__all__ = [
    "GroupEstimate",
    "NoiseScaleEstimate",
    "contradiction_message",
    "group_estimate",
    "noise_scale_estimate",
    "trace_sigma_negative",
]

_CHECK = (
    "Check that the loss conventions given to the meter match the loop (reduction=, accumulation=), "
    "that no DDP communication hook sums the replicas' gradients without dividing by the world size, "
    "that a GradScaler scaling the loss is passed to the meter (scaler=), that nothing changes .grad "
    "between the backward passes and update() (weight decay or a penalty added into .grad: use "
    "read_grad='after_backward'), and, under per_example, that no parameter is used outside the layer "
    "that owns it. Then call meter.reset()."
)


def contradiction_message(*, contradicted_steps: int, steps: int, trace_sigma_negative: bool) -> str | None:
    """Why the records are impossible for a mean of small batches, or None if they are not.

    Args:
        contradicted_steps: steps whose big-batch squared norm exceeded the weighted mean of
            the small batches' (beyond float tolerance).
        steps: steps folded in since the last reset.
        trace_sigma_negative: the averaged tr(Sigma) is significantly negative.

    Example:
        >>> contradiction_message(contradicted_steps=0, steps=5, trace_sigma_negative=False) is None
        True
    """
    found = []
    if contradicted_steps:
        found.append(
            f"in {contradicted_steps} of {steps} steps the big batch's squared gradient norm exceeded the "
            "(weighted) mean of the micro-batch (or per-example) squared norms, which a mean cannot do"
        )
    if trace_sigma_negative:
        found.append("the averaged tr(Sigma) is significantly negative, which a variance cannot be")
    if not found:
        return None
    return "the big batch is not the mean of the small ones: " + "; and ".join(found) + ". " + _CHECK


class GroupEstimate(NamedTuple):
    """B_simple of one parameter group (or of the whole model).

    ``b_simple`` is in examples (the unit the loss is averaged over). ``b_simple``,
    ``b_simple_ci`` and ``b_simple_se`` are None while not resolved (see the module).
    ``contradiction`` says why the records are impossible, when they are (then never resolved).
    """

    b_simple: float | None
    b_simple_ci: tuple[float, float] | None
    b_simple_se: float | None
    grad_norm_sq: float
    trace_sigma: float
    resolved: bool
    contradiction: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (None becomes null)."""
        d = self._asdict()
        d["b_simple_ci"] = None if self.b_simple_ci is None else list(self.b_simple_ci)
        return d

    def describe(self, unit: str = "examples", confidence: float = 0.95) -> str:
        """``B_simple = 307 images [250, 390] (95%)``, or ``B_simple not resolved``.

        Args:
            unit: what the loss averages over (images, tokens, observations, examples).
            confidence: the level the meter was created with (its ``confidence``).
        """
        return describe_b_simple(self.b_simple, self.b_simple_ci, unit, confidence)


class NoiseScaleEstimate(NamedTuple):
    """What :meth:`GradientNoiseScale.compute` returns.

    Attributes:
        b_simple: tr(Sigma)/|G|^2 from the averaged parts, examples; None if not resolved.
        b_simple_ci: confidence interval ``(low, high)`` (Fieller), examples, or None.
        b_simple_se: delta-method standard error, examples, or None.
        grad_norm_sq: averaged |G|^2 estimate (may be <= 0 early: then not resolved); NaN
            before any step.
        trace_sigma: averaged tr(Sigma) estimate; NaN before any step.
        resolved: True when |G|^2 is significantly positive, tr(Sigma) positive, the
            interval bounded and the records consistent (``contradiction`` None).
        steps: optimiser steps folded in since the last reset (skipped ones included).
        examples: examples seen in those steps.
        skipped_steps: steps skipped for non-finite gradients (e.g. AMP overflow).
        n_eff: effective number of steps in the average, ``(sum w)^2 / sum w^2``.
        groups: per parameter group estimates (default: one per module); the total is
            their mediant.
        param_groups: per optimizer parameter group (empty unless the meter was given
            the optimizer); the total is their mediant too.
        contradiction: None, or why the records contradict "the big batch is the mean of
            the small ones" and what to check (the estimate is then not resolved).
        preconditioned: under a diagonal preconditioner ``P`` (the meter's
            ``preconditioner=``), the noise scale of the preconditioned gradient, reported
            next to the raw one: ``grad_norm_sq`` is G^T P G, ``trace_sigma`` tr(P Sigma),
            ``b_simple`` tr(P Sigma)/(G^T P G) in examples, with its interval and the same
            "resolved" rule, without groups; ``skipped_steps`` also counts the steps before
            the preconditioner existed (Adam without state). None without a preconditioner.
    """

    b_simple: float | None
    b_simple_ci: tuple[float, float] | None
    b_simple_se: float | None
    grad_norm_sq: float
    trace_sigma: float
    resolved: bool
    steps: int
    examples: int
    skipped_steps: int
    n_eff: float
    groups: dict[str, GroupEstimate]
    param_groups: Mapping[str, GroupEstimate] = {}  # never mutated
    contradiction: str | None = None
    preconditioned: NoiseScaleEstimate | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (None becomes null, groups and ``preconditioned`` nested)."""
        d = self._asdict()
        d["b_simple_ci"] = None if self.b_simple_ci is None else list(self.b_simple_ci)
        d["groups"] = {k: v.to_dict() for k, v in self.groups.items()}
        d["param_groups"] = {k: v.to_dict() for k, v in self.param_groups.items()}
        d["preconditioned"] = None if self.preconditioned is None else self.preconditioned.to_dict()
        return d

    def describe(self, unit: str = "examples", confidence: float = 0.95) -> str:
        """``B_simple = 307 images [250, 390] (95%)``, or ``B_simple not resolved``.

        Under a preconditioner the preconditioned value follows:
        ``...; preconditioned: B_simple = 120 images [95.1, 160] (95%)``.

        Args:
            unit: what the loss averages over (images, tokens, observations, examples).
            confidence: the level the meter was created with (its ``confidence``).
        """
        raw = describe_b_simple(self.b_simple, self.b_simple_ci, unit, confidence)
        if self.preconditioned is None:
            return raw
        return f"{raw}; preconditioned: {self.preconditioned.describe(unit, confidence)}"


def _number(x: float) -> float | None:
    return None if math.isnan(x) else x


def trace_sigma_negative(iv: BSimpleInterval, j: int, *, batch: float, rtol: float) -> bool:
    """Whether series ``j``'s tr(Sigma) is significantly negative, beyond float rounding.

    Its upper confidence bound must be below ``-2 rtol (batch |G|^2 + |tr Sigma|)``: a step's
    tr(Sigma) estimate is a difference of squared norms about ``batch |G|^2 + tr Sigma`` in
    size (SCIENCE.md, k-way form), each rounded to ``rtol``, so steps that repeat the same
    numbers (zero spread) are not called negative for their rounding alone. The steps are
    taken as independent (fresh batches); steps that repeat the same data with unequal
    micro-batches, whose tr(Sigma) estimate can be negative, break that assumption.

    Args:
        iv: the interval of every series.
        j: the series.
        batch: mean examples per step.
        rtol: relative rounding of the squared norms (:func:`noisescale.estimators.contradiction_rtol`).
    """
    g, s, upper = float(iv.grad_norm_sq[j]), float(iv.trace_sigma[j]), float(iv.trace_sigma_upper[j])
    return upper < -2.0 * rtol * (batch * abs(g) + abs(s))


def group_estimate(
    iv: BSimpleInterval, j: int, *, steps: int, examples: int, contradicted_steps: int, rtol: float
) -> GroupEstimate:
    """Series ``j`` of an interval as a :class:`GroupEstimate`: the one "None unless resolved" rule.

    Args:
        iv: :func:`noisescale.uncertainty.b_simple_interval` of the meter's state, ``[S]`` fields.
        j: the series.
        steps: steps folded in (0: the parts are NaN).
        examples: examples in them.
        contradicted_steps: steps of this series whose records were impossible for a mean.
        rtol: relative rounding of the squared norms (for :func:`trace_sigma_negative`).

    Returns:
        The estimate; resolved only if ``iv`` says so and the records are consistent.
    """
    negative = steps > 0 and trace_sigma_negative(iv, j, batch=examples / steps, rtol=rtol)
    contradiction = contradiction_message(
        contradicted_steps=contradicted_steps, steps=steps, trace_sigma_negative=negative
    )
    resolved = bool(iv.resolved[j]) and contradiction is None
    return GroupEstimate(
        b_simple=_number(float(iv.b_simple[j])) if resolved else None,
        b_simple_ci=(float(iv.low[j]), float(iv.high[j])) if resolved else None,
        b_simple_se=_number(float(iv.se[j])) if resolved else None,
        grad_norm_sq=float(iv.grad_norm_sq[j]) if steps else math.nan,
        trace_sigma=float(iv.trace_sigma[j]) if steps else math.nan,
        resolved=resolved,
        contradiction=contradiction,
    )


def noise_scale_estimate(
    iv: BSimpleInterval,
    contradicted: list[int],
    *,
    group_names: list[str],
    param_group_names: list[str],
    steps: int,
    examples: int,
    skipped_steps: int,
    rtol: float,
) -> NoiseScaleEstimate:
    """The total (last series), the groups, then the optimizer groups, as one estimate.

    Args:
        iv: the interval of every series, ``[S]`` fields, ``S = groups + param groups + 1``.
        contradicted: ``[S]`` steps whose records were impossible, per series.
        group_names: the groups' names, in series order.
        param_group_names: the optimizer groups' names, in series order.
        steps: steps folded in since the last reset.
        examples: examples in them.
        skipped_steps: of them, skipped for non-finite gradients.
        rtol: relative rounding of the squared norms.
    """

    def series(j: int) -> GroupEstimate:
        return group_estimate(
            iv, j, steps=steps, examples=examples, contradicted_steps=contradicted[j], rtol=rtol
        )

    m = len(group_names)
    total = series(len(contradicted) - 1)
    return NoiseScaleEstimate(
        b_simple=total.b_simple,
        b_simple_ci=total.b_simple_ci,
        b_simple_se=total.b_simple_se,
        grad_norm_sq=total.grad_norm_sq,
        trace_sigma=total.trace_sigma,
        resolved=total.resolved,
        steps=steps,
        examples=examples,
        skipped_steps=skipped_steps,
        n_eff=float(iv.n_eff[-1]) if steps else 0.0,
        groups={name: series(j) for j, name in enumerate(group_names)},
        param_groups={name: series(m + i) for i, name in enumerate(param_group_names)},
        contradiction=total.contradiction,
    )
