r"""Standard error and confidence interval of B_simple = E[S] / E[G].

B_simple is a ratio of two averages of noisy per-step estimates, ``S_t`` of
tr(Sigma) and ``G_t`` of |G|^2. Its interval is Fieller's (1954): the set of
ratios ``rho`` for which ``S_bar - rho G_bar`` is not significantly non-zero,

.. math::

    (\bar S - \rho \bar G)^2 \le t^2_{q,\,n-1}
    \left(v_{SS} - 2\rho v_{SG} + \rho^2 v_{GG}\right),

with ``v`` the estimated (co)variances of the weighted means and ``n`` the effective
number of steps ``(sum w)^2 / sum w^2``. Unlike the delta method it stays honest
when G_bar is small: when |G|^2 is not significantly positive the set is unbounded,
and the noise scale is reported as not resolved. The standard error is the delta
method's, ``sqrt(v_SS - 2 R v_SG + R^2 v_GG) / G_bar``.

A noise scale is resolved only when it is possible: |G|^2 significantly positive (a
bounded interval) AND the averaged tr(Sigma) positive. The upper confidence bound of
tr(Sigma), ``S_bar + t sqrt(v_SS)`` (one-sided at ``(1 + confidence) / 2``), is returned too:
below zero, tr(Sigma) is significantly negative, which gradients whose big batch is the
mean of the small ones cannot give (:mod:`noisescale.meter.results` names what to check).

The per-step estimates are treated as independent. At fixed parameters they are
(fresh batches); along training the drift of the true values inflates the spread,
which makes the interval conservative.

References:
    Fieller (1954), Some problems in interval estimation, JRSS B 16(2).
    McCandlish et al. (2018), arXiv:1812.06162, eq. (2.9) and appendix A.1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from scipy import stats

from noisescale.smoothing import ema_means

__all__ = ["BSimpleInterval", "b_simple_interval"]


class BSimpleInterval(NamedTuple):
    """B_simple with its uncertainty; each field ``[P]`` float64 on the CPU.

    ``b_simple`` is NaN where the averaged |G|^2 is not positive; ``low``/``high``
    and ``se`` are NaN where not resolved; ``resolved`` is True where the interval is
    bounded (|G|^2 significantly positive at the confidence level) and the averaged
    tr(Sigma) positive.
    """

    grad_norm_sq: torch.Tensor  # bias-corrected average of |G|^2
    trace_sigma: torch.Tensor  # bias-corrected average of tr(Sigma)
    b_simple: torch.Tensor  # examples
    se: torch.Tensor  # examples
    low: torch.Tensor  # examples
    high: torch.Tensor  # examples
    resolved: torch.Tensor  # bool
    n_eff: torch.Tensor  # effective number of steps averaged
    trace_sigma_upper: torch.Tensor  # upper confidence bound of tr(Sigma); NaN below 1.5 effective steps


def b_simple_interval(state: torch.Tensor, confidence: float = 0.95) -> BSimpleInterval:
    """Point estimate, standard error and Fieller interval of B_simple per series.

    Args:
        state: ``[9, P]`` averaging state (:func:`noisescale.smoothing.ema_fold`).
        confidence: two-sided level of the interval, in (0, 1).

    Returns:
        BSimpleInterval with fields of shape ``[P]``.

    Raises:
        ValueError: if ``confidence`` is not in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"expected `confidence` in (0, 1) but got {confidence}")
    st = state.detach().to("cpu", torch.float64)
    g_bar, s_bar = ema_means(st)
    w, _, _, w2, w2g, w2s, w2gg, w2ss, w2gs = st  # rows: noisescale.smoothing.FIELDS
    n_eff = w.square() / w2
    # Centred weighted second moments, then the variance of a weighted mean with
    # the n/(n-1) correction (equal weights: s^2 / n).
    c_gg = w2gg - 2 * g_bar * w2g + g_bar.square() * w2
    c_ss = w2ss - 2 * s_bar * w2s + s_bar.square() * w2
    c_gs = w2gs - g_bar * w2s - s_bar * w2g + g_bar * s_bar * w2
    scale = n_eff / (n_eff - 1) / w.square()
    v_gg, v_ss, v_gs = c_gg * scale, c_ss * scale, c_gs * scale

    df = (n_eff - 1).clamp(min=1e-12).numpy()
    t = torch.as_tensor(stats.t.ppf(0.5 + confidence / 2, df), dtype=torch.float64)
    t2 = t.square()

    positive = g_bar > 0
    b_simple = torch.where(positive, s_bar / g_bar, torch.full_like(g_bar, float("nan")))
    se = (v_ss - 2 * b_simple * v_gs + b_simple.square() * v_gg).clamp(min=0).sqrt() / g_bar

    # Fieller: a rho^2 - 2 b rho + c <= 0.
    a = g_bar.square() - t2 * v_gg
    b = g_bar * s_bar - t2 * v_gs
    c = s_bar.square() - t2 * v_ss
    disc = (b.square() - a * c).clamp(min=0).sqrt()
    enough = n_eff > 1.5
    resolved = positive & enough & (a > 0) & (s_bar > 0)
    upper = torch.where(enough, s_bar + t * v_ss.clamp(min=0).sqrt(), torch.full_like(s_bar, float("nan")))
    nan = torch.full_like(g_bar, float("nan"))
    low = torch.where(resolved, (b - disc) / a, nan)
    high = torch.where(resolved, (b + disc) / a, nan)
    se = torch.where(resolved, se, nan)
    return BSimpleInterval(g_bar, s_bar, b_simple, se, low, high, resolved, n_eff, upper)
