"""Bias-corrected exponential moving averages of |G|^2 and tr(Sigma), kept apart.

B_simple is a ratio of expectations, so the numerator and the denominator are
averaged separately and divided only at the end (SCIENCE.md, appendix A.1: the
mean of per-step ratios is biased and can even be negative).

The state holds weighted sums over steps. Step ``t`` has weight
``w_t = (1 - beta_t) * prod_{u > t} beta_u``; dividing by ``sum_t w_t`` is the
bias correction (Adam-style), exact for any sequence of decays, so the decay can be
set per step or in examples (``beta_t = exp(-B_t / tau)``). Second-order sums
(``sum w^2 x y``) feed the uncertainty (:mod:`noisescale.uncertainty`). ``beta = 1``
gives the plain mean over all steps.

Shape letter: ``P`` series (parameter groups, plus the total).

Non-finite steps are skipped on the device without a host synchronisation: their
weight is zero and the decay is not applied.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["EmaState", "decay_for_step", "ema_init", "ema_means", "ema_update"]


class EmaState(NamedTuple):
    """Sufficient statistics of the weighted average. Every field has shape ``[P]``, dtype float64."""

    w: torch.Tensor  # sum_t w_t (bias-correction normaliser), dimensionless
    g: torch.Tensor  # sum_t w_t G_t, G_t the step's |G|^2 estimate
    s: torch.Tensor  # sum_t w_t S_t, S_t the step's tr(Sigma) estimate
    w2: torch.Tensor  # sum_t w_t^2
    w2g: torch.Tensor  # sum_t w_t^2 G_t
    w2s: torch.Tensor  # sum_t w_t^2 S_t
    w2gg: torch.Tensor  # sum_t w_t^2 G_t^2
    w2ss: torch.Tensor  # sum_t w_t^2 S_t^2
    w2gs: torch.Tensor  # sum_t w_t^2 G_t S_t


def ema_init(n: int, device: torch.device | str | None = None) -> EmaState:
    """An empty state for ``n`` series (float64 zeros on ``device``)."""
    return EmaState(*(torch.zeros(n, dtype=torch.float64, device=device) for _ in EmaState._fields))


def decay_for_step(*, ema_decay: float | None, ema_examples: float | None, examples: float) -> float:
    """Per-step decay: ``ema_decay`` itself, or ``exp(-examples / ema_examples)``.

    Setting the time constant in examples makes runs at different batch sizes
    average over the same amount of data (AdaptDL uses ``0.999 ** (B / B0)``).

    Raises:
        ValueError: if both or neither are given, or a value is out of range.
    """
    if (ema_decay is None) == (ema_examples is None):
        raise ValueError("give exactly one of `ema_decay` (per step) and `ema_examples` (examples)")
    if ema_examples is not None:
        if not ema_examples > 0:
            raise ValueError(f"expected `ema_examples` > 0 but got {ema_examples}")
        return math.exp(-examples / ema_examples)
    assert ema_decay is not None
    if not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"expected `ema_decay` in [0, 1] but got {ema_decay}")
    return ema_decay


def ema_update(
    state: EmaState, grad_norm_sq: torch.Tensor, trace_sigma: torch.Tensor, beta: float
) -> tuple[EmaState, torch.Tensor]:
    """Fold one step's estimates into the averages; skip it if any value is not finite.

    Args:
        state: current sums, fields ``[P]``.
        grad_norm_sq: ``[P]`` this step's unbiased |G|^2 estimates.
        trace_sigma: ``[P]`` this step's unbiased tr(Sigma) estimates.
        beta: decay in [0, 1] applied to the past.

    Returns:
        ``(new_state, finite)`` with ``finite`` a 0-d bool tensor (on the device, not
        synchronised) telling whether the step was used.
    """
    g = grad_norm_sq.to(torch.float64)
    s = trace_sigma.to(torch.float64)
    finite = torch.isfinite(g).all() & torch.isfinite(s).all()
    g = torch.where(finite, g, torch.zeros_like(g))
    s = torch.where(finite, s, torch.zeros_like(s))
    one = torch.ones((), dtype=torch.float64, device=g.device)
    b = torch.where(finite, one * beta, one)  # skipped step: no decay
    a = torch.where(finite, one * (1.0 - beta), one * 0.0)  # and no weight
    if beta == 1.0:  # plain mean: every step has weight one
        a = finite.to(torch.float64)
    b2 = b * b
    a2 = a * a
    new = EmaState(
        w=b * state.w + a,
        g=b * state.g + a * g,
        s=b * state.s + a * s,
        w2=b2 * state.w2 + a2,
        w2g=b2 * state.w2g + a2 * g,
        w2s=b2 * state.w2s + a2 * s,
        w2gg=b2 * state.w2gg + a2 * g * g,
        w2ss=b2 * state.w2ss + a2 * s * s,
        w2gs=b2 * state.w2gs + a2 * g * s,
    )
    return new, finite


def ema_means(state: EmaState) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias-corrected averages ``(grad_norm_sq, trace_sigma)``, each ``[P]`` (NaN before any step)."""
    return state.g / state.w, state.s / state.w
