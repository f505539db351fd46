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

The state is one ``[9, P]`` float64 tensor whose rows are the sums named in
:data:`FIELDS`, so that one step updates it in a handful of fused tensor operations
(the meter runs this every optimiser step).

Shape letter: ``P`` series (parameter groups, plus the total).

Non-finite steps are skipped on the device without a host synchronisation: their
weight is zero and the decay is not applied.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["FIELDS", "decay_for_step", "ema_init", "ema_means", "ema_update"]

FIELDS = ("w", "g", "s", "w2", "w2g", "w2s", "w2gg", "w2ss", "w2gs")
"""Rows of the state: with ``w_t`` the step weights and ``G_t``, ``S_t`` the step's |G|^2
and tr(Sigma) estimates, ``sum w``, ``sum w G``, ``sum w S``, ``sum w^2``, ``sum w^2 G``,
``sum w^2 S``, ``sum w^2 G^2``, ``sum w^2 S^2``, ``sum w^2 G S``."""


def ema_init(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """An empty state for ``n`` series: ``[9, n]`` float64 zeros on ``device`` (rows: :data:`FIELDS`)."""
    return torch.zeros(len(FIELDS), n, dtype=torch.float64, device=device)


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


@functools.lru_cache(maxsize=64)
def _coefficients(beta: float, device: torch.device) -> torch.Tensor:
    """``[2, 2, 9, 1]``: (used step, skipped step) x (decay of the past, weight of the step) per row.

    A used step has weight ``a = 1 - beta`` (1 when ``beta = 1``: the plain mean), the
    first-order rows decay by ``beta`` and take ``a``, the second-order rows ``beta^2``
    and ``a^2``. A skipped step decays nothing and adds nothing.
    """
    a = 1.0 if beta == 1.0 else 1.0 - beta
    used = [[beta] * 3 + [beta * beta] * 6, [a] * 3 + [a * a] * 6]
    skipped = [[1.0] * 9, [0.0] * 9]
    return torch.tensor([used, skipped], dtype=torch.float64, device=device).unsqueeze(-1)


@functools.lru_cache(maxsize=8)
def _term_rows(device: torch.device) -> torch.Tensor:
    """Rows of the ``3 x 3`` products of ``(1, G, S)`` that make the :data:`FIELDS` terms, in order."""
    one, g, s = 0, 1, 2
    pairs = [(one, one), (one, g), (one, s)] * 2 + [(g, g), (s, s), (g, s)]
    return torch.tensor([3 * i + j for i, j in pairs], device=device)


def ema_update(state: torch.Tensor, stats: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one step's estimates into the averages; skip it if any value is not finite.

    Args:
        state: current sums, ``[9, P]`` (rows: :data:`FIELDS`).
        stats: ``[2, P]`` this step's unbiased estimates: rows |G|^2 (``grad_norm_sq``)
            and tr(Sigma) (``trace_sigma``).
        beta: decay in [0, 1] applied to the past.

    Returns:
        ``(new_state, finite)`` with ``finite`` a 0-d bool tensor (on the device, not
        synchronised) telling whether the step was used.
    """
    x = stats.to(torch.float64)
    finite = torch.isfinite(x).all()
    x = torch.where(finite, x, 0.0)  # a skipped step's NaN must not reach 0 * NaN
    x1 = torch.nn.functional.pad(x, (0, 0, 1, 0), value=1.0)  # [3, P]: 1, G, S
    terms = (x1[:, None] * x1[None]).flatten(0, 1)[_term_rows(state.device)]  # [9, P]
    decay, weight = torch.where(finite, *_coefficients(float(beta), state.device).unbind())
    return torch.addcmul(state * decay, weight, terms), finite


def ema_means(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias-corrected averages ``(grad_norm_sq, trace_sigma)``, each ``[P]`` (NaN before any step)."""
    return state[1] / state[0], state[2] / state[0]
