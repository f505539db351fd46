"""Bias-corrected exponential moving averages of |G|^2 and tr(Sigma), kept apart.

B_simple is a ratio of expectations, so the numerator and the denominator are
averaged separately and divided only at the end (SCIENCE.md, appendix A.1: the
mean of per-step ratios is biased and can even be negative).

The state holds weighted sums over steps. Step ``t`` has weight
``w_t = (1 - beta_t) * prod_{u > t} beta_u``; dividing by ``sum_t w_t`` is the
bias correction (Adam-style), exact for any sequence of decays, so the decay can be
set per step or in examples (``beta_t = exp(-B_t / tau)``,
:meth:`noisescale.options.Averaging.decay`). Second-order sums
(``sum w^2 x y``) feed the uncertainty (:mod:`noisescale.uncertainty`). ``beta = 1``
gives the plain mean over all steps.

The state is one ``[9, P]`` float64 tensor whose rows are the sums named in
:data:`FIELDS`, so that any number of steps fold into it in a fixed number of tensor
operations (the meter folds all the steps since its last fold at once).

Shape letter: ``P`` series (parameter groups, plus the total).

Non-finite steps are skipped on the device without a host synchronisation: their
weight is zero and the decay is not applied.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

__all__ = ["FIELDS", "ema_fold", "ema_init", "ema_means"]

FIELDS = ("w", "g", "s", "w2", "w2g", "w2s", "w2gg", "w2ss", "w2gs")
"""Rows of the state: with ``w_t`` the step weights and ``G_t``, ``S_t`` the step's |G|^2
and tr(Sigma) estimates, ``sum w``, ``sum w G``, ``sum w S``, ``sum w^2``, ``sum w^2 G``,
``sum w^2 S``, ``sum w^2 G^2``, ``sum w^2 S^2``, ``sum w^2 G S``."""


def ema_init(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """An empty state for ``n`` series: ``[9, n]`` float64 zeros on ``device`` (rows: :data:`FIELDS`)."""
    return torch.zeros(len(FIELDS), n, dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=8)
def _term_rows(device: torch.device) -> torch.Tensor:
    """Rows of the ``3 x 3`` products of ``(1, G, S)`` that make the :data:`FIELDS` terms, in order."""
    one, g, s = 0, 1, 2
    pairs = [(one, one), (one, g), (one, s)] * 2 + [(g, g), (s, s), (g, s)]
    return torch.tensor([3 * i + j for i, j in pairs], device=device)


@functools.lru_cache(maxsize=64)
def _decays(betas: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, 9]`` decay of the past and weight of the step, per row, for used steps with these decays.

    A used step has weight ``a = 1 - beta`` (1 when ``beta = 1``: the plain mean); the
    first-order rows decay by ``beta`` and take ``a``, the second-order rows ``beta^2``
    and ``a^2``. Cached: the same decays (batch sizes) recur, and on an accelerator a
    new tensor from the host would wait for the device.
    """
    rows = []
    for beta in betas:
        a = 1.0 if beta == 1.0 else 1.0 - beta
        rows.append([[beta] * 3 + [beta * beta] * 6, [a] * 3 + [a * a] * 6])
    both = torch.tensor(rows, dtype=torch.float64, device=device)  # [N, 2, 9]
    return both[:, 0], both[:, 1]


def ema_fold(
    state: torch.Tensor, stats: torch.Tensor, betas: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``N`` steps' estimates into the averages, oldest first; skip the non-finite ones.

    The same as folding the steps one at a time, in a fixed number of tensor operations
    whatever ``N`` (the meter folds the steps since the last fold at once): with ``d_t``
    the per-row decay of step ``t`` (``beta_t``, or ``beta_t^2`` for the second-order
    rows; 1 for a skipped step) and ``a_t`` its weight (``1 - beta_t``, squared for
    the second-order rows, 1 when ``beta_t = 1``; 0 for a skipped step), the new state is
    ``prod_t d_t * state + sum_t (prod_{u > t} d_u) a_t terms_t`` (:func:`_decays`).

    Args:
        state: current sums, ``[9, P]`` float64 (rows: :data:`FIELDS`).
        stats: ``[N, 2, P]`` the steps' unbiased estimates: rows |G|^2
            (``grad_norm_sq``) and tr(Sigma) (``trace_sigma``).
        betas: the ``N`` steps' decays in [0, 1], applied to everything before them.

    Returns:
        ``(new_state, finite)`` with ``finite`` an ``[N]`` bool tensor (on the device, not
        synchronised) telling which steps were used.

    Raises:
        ValueError: if ``stats`` is not ``[N, 2, P]`` with ``N >= 1`` and the state's ``P``,
            or ``len(betas)`` is not ``N``.
    """
    if stats.dim() != 3 or stats.shape[0] < 1 or stats.shape[1:] != (2, state.shape[1]):
        raise ValueError(
            f"expected stats of shape [N >= 1, 2, {state.shape[1]}] (steps, (|G|^2, tr Sigma), series) "
            f"but got {list(stats.shape)}"
        )
    if len(betas) != stats.shape[0]:
        raise ValueError(f"{len(betas)} decays for {stats.shape[0]} steps")
    x = stats.to(torch.float64)
    finite = torch.isfinite(x).flatten(1).all(1)  # [N]
    x = torch.where(finite[:, None, None], x, 0.0)  # a skipped step's NaN must not reach 0 * NaN
    x1 = torch.nn.functional.pad(x, (0, 0, 1, 0), value=1.0)  # [N, 3, P]: 1, G, S
    terms = (x1[:, :, None] * x1[:, None]).flatten(1, 2)[:, _term_rows(state.device)]  # [N, 9, P]
    used_decay, used_weight = _decays(tuple(float(b) for b in betas), state.device)  # [N, 9] each
    decay = torch.where(finite[:, None], used_decay, 1.0)
    weight = torch.where(finite[:, None], used_weight, 0.0)
    after = torch.cat([decay[1:].flip(0).cumprod(0).flip(0), torch.ones_like(decay[:1])])  # prod_{u > t}
    new = (decay[0] * after[0])[:, None] * state + torch.einsum("nf,nfp->fp", after * weight, terms)
    return new, finite


def ema_means(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias-corrected averages ``(grad_norm_sq, trace_sigma)``, each ``[P]`` (NaN before any step)."""
    return state[1] / state[0], state[2] / state[0]
