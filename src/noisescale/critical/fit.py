r"""Critical batch size from a batch-size sweep: a fit of the steps-examples hyperbola.

Training to a fixed goal at batch size ``B`` takes ``S`` steps and ``E = B S`` examples, with

.. math::

    \left(\frac{S}{S_{min}} - 1\right)\left(\frac{E}{E_{min}} - 1\right) = 1,
    \qquad B_{crit} = \frac{E_{min}}{S_{min}},

equivalently ``S(B) = S_min (1 + B_crit/B)`` and ``E(B) = E_min (1 + B/B_crit)``
(McCandlish et al. 2018, eqs. 2.11-2.12). As in the paper (appendix A.3) the fit is least
squares in log space, ``log S_i = log S_min + log(1 + B_crit/B_i) + e_i``, over
``log S_min`` and ``log B_crit``; ``B_crit`` is searched within ``[B_lo/100, B_hi*100]``
(``B_lo``, ``B_hi``: smallest and largest batch size that reached the goal).

Censored runs (stopped after ``S_obs`` steps without reaching the goal) only say
``S(B) > S_obs``. They enter as one-sided residuals ``min(0, log S_model - log S_obs)``:
a censored run costs nothing while the curve predicts more steps than the run spent, and
is penalised quadratically when the curve predicts fewer, i.e. least squares under the
inequality ``S_model(B) >= S_obs`` (the zero-variance limit of a Tobit likelihood).

Intervals come from a wild bootstrap (Wu 1986; Davidson & Flachaire 2008): each resample
keeps the batch sizes, adds to the fitted log-steps the residuals with random Rademacher signs
(censored runs are kept as they are) and refits. It keeps the design fixed, so a resample never
loses the batch sizes that pin ``B_crit`` down (case resampling of 5 runs leaves fewer than 3
distinct batch sizes 10% of the time), and it carries the misfit of a curve that is not exactly
a hyperbola into the interval. Two small-sample corrections make the coverage close to nominal
with few runs: residuals are divided by ``1 - h_i`` (leverage ``h_i``; the HC3 choice of
MacKinnon & White 1985), and the percentile interval is widened around the estimate (log
scale) by ``t_{n-2}/z``, the ratio of the exact linear-Gaussian interval to the known-variance
one. Simulated coverage of the 95% intervals at 5% log-normal scatter (300 sweeps each):
B_crit 0.99/0.95/0.95/0.95 and S_min 0.98/0.93/0.94/0.94 for 5/8/12/20 batch sizes. Every
resample is fitted at once: a grid over ``log B_crit`` with ``log S_min`` solved exactly
(variable projection), a finer grid, a parabolic step and a few Gauss-Newton steps.

Steps read off a logged curve lie between two logged steps (interval-censored,
:mod:`noisescale.critical.goals`); given that bracket, each resample also draws the crossing
uniformly within it (``+ log u - log S_i``): coarse logging widens the interval, never biases it.

``B_crit`` is *bracketed* when the estimate lies within ``[B_lo, B_hi]`` and its interval
within ``[B_lo/2, 2 B_hi]``. Otherwise the result carries no value but a one-sided bound
from the bootstrap quantile at the confidence level (same expansion), capped at the edge of the grid
(e.g. ``"B_crit > 4096"``: the sweep shows near-perfect scaling up to its largest batch).

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    eqs. (2.11)-(2.12), appendix A.2-A.3 and D.
    Wu (1986), Jackknife, bootstrap and other resampling methods in regression analysis,
    Ann. Statist. 14(4). Davidson & Flachaire (2008), The wild bootstrap, tamed at last,
    J. Econometrics 146(1). MacKinnon & White (1985), Some heteroskedasticity-consistent
    covariance matrix estimators with improved finite sample properties, J. Econometrics 29(3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import optimize, stats

from noisescale._format import format_batch
from noisescale.errors import SweepDataError

__all__ = ["MIN_BOOTSTRAP", "CriticalBatchFit", "check_fit_settings", "fit_critical_batch"]

MIN_BOOTSTRAP = 100  # fewest resamples for a percentile interval (2-3 beyond each 95% end)

_SEARCH_FACTOR = 100.0  # B_crit is searched within [B_lo / 100, B_hi * 100]
_BRACKET_SLACK = 2.0  # a bracketed interval may reach one doubling beyond the grid
_COARSE_GRID = 161  # points of the first grid over log B_crit
_FINE_GRID = 21  # points of the refining grid, spanning two coarse cells
_MAX_LEVERAGE = 0.9  # caps the leverage correction 1/(1 - h) at 10
_CHUNK_CELLS = 2_000_000  # float64 cells per work array of the vectorised bootstrap fit


class CriticalBatchFit(NamedTuple):
    """Fitted hyperbola ``S(B) = S_min (1 + B_crit/B)`` for one goal.

    Batch sizes and ``E_min`` are in the user's unit (examples or tokens); ``S_min`` in steps.
    Intervals are two-sided bootstrap percentile intervals at ``confidence``.
    """

    s_min: float  # steps; minimum number of steps (B -> infinity)
    e_min: float  # examples; minimum number of examples (B -> 0), = s_min * b_crit_fit
    b_crit: float | None  # examples; None unless bracketed (then see `bound`)
    b_crit_fit: float  # examples; raw least-squares estimate, may sit on the search boundary
    b_crit_ci: tuple[float, float]  # examples
    s_min_ci: tuple[float, float]  # steps
    e_min_ci: tuple[float, float]  # examples
    n_points: int  # runs used, censored included
    n_censored: int  # runs that stopped before reaching the goal
    bracketed: bool  # B_crit lies inside the sweep and the data constrain it
    bound: str | None  # one-sided statement when not bracketed, e.g. "B_crit > 4096"
    bound_value: float | None  # examples; the number in `bound`
    residual_sd: float  # sd of log-step residuals (~ relative scatter of the runs)
    confidence: float  # level of the intervals and of the bound
    batch_range: tuple[float, float]  # smallest and largest batch size reaching the goal

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``b_crit`` and the open side of ``b_crit_ci`` are None unless bracketed."""
        ci: list[float | None] = [float(v) for v in self.b_crit_ci]
        if not self.bracketed:
            ci = [None, None]
            if self.bound is not None:
                ci = [self.bound_value, None] if ">" in self.bound else [None, self.bound_value]
        return {
            "b_crit": self.b_crit,
            "b_crit_ci": ci,
            "bracketed": self.bracketed,
            "bound": self.bound,
            "s_min": self.s_min,
            "s_min_ci": list(self.s_min_ci),
            "e_min": self.e_min,
            "e_min_ci": list(self.e_min_ci),
            "b_crit_fit": self.b_crit_fit,
            "n_points": self.n_points,
            "n_censored": self.n_censored,
            "residual_sd": self.residual_sd,
            "confidence": self.confidence,
            "batch_range": list(self.batch_range),
        }


def fit_critical_batch(
    batch_sizes: Sequence[float] | np.ndarray,
    steps: Sequence[float] | np.ndarray,
    *,
    reached: Sequence[bool] | np.ndarray | None = None,
    steps_low: Sequence[float] | np.ndarray | None = None,
    steps_high: Sequence[float] | np.ndarray | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    max_increase: float = 1.5,
    seed: int = 0,
) -> CriticalBatchFit:
    r"""Fit ``S(B) = S_min (1 + B_crit/B)`` to steps-to-goal measured at several batch sizes.

    .. math::

        \min_{S_{min}, B_{crit}} \sum_i \left[\log S_i - \log S_{min}
        - \log\left(1 + B_{crit}/B_i\right)\right]^2

    with censored runs entering one-sided (see the module docstring).

    Args:
        batch_sizes: batch size of each run ``[N]``, in examples (or tokens).
        steps: steps each run took to reach the goal ``[N]``; for a censored run, the steps
            it ran without reaching it.
        reached: ``[N]`` bool, False for a censored run (its steps-to-goal exceeds ``steps``).
            Default: every run reached the goal.
        steps_low: ``[N]`` steps; for a reached run read off a logged curve, the last logged
            step above the goal (its crossing lies in ``(steps_low, steps_high]``, see
            :func:`noisescale.critical.goals.crossing`). Ignored for censored runs. Default:
            ``steps`` (the crossing is known exactly).
        steps_high: ``[N]`` steps; the first logged step at or below the goal. Default: ``steps``.
        n_bootstrap: wild-bootstrap resamples for the intervals (at least ``MIN_BOOTSTRAP``, 100).
        confidence: level of the two-sided intervals and of a one-sided bound, in (0, 1).
        max_increase: largest tolerated ratio between the steps of a run and the fewest steps
            any smaller batch size needed. The hyperbola cannot increase with B; the default
            1.5 is ~3 standard deviations of the log-ratio of two runs with 10% log-normal
            scatter each (sd 0.14; log 1.5 = 0.41). At least 1 (``inf``: no check).
        seed: seed of the bootstrap signs.

    Returns:
        CriticalBatchFit.

    Raises:
        SweepDataError: on empty, non-finite or non-positive values, arrays of different
            lengths, a batch size given twice, fewer than 3 distinct batch sizes reaching the
            goal, steps that increase with batch size by more than ``max_increase``, or a
            bracket that does not hold its steps (``steps_low <= steps <= steps_high``).
        ValueError: on a bad setting (see :func:`check_fit_settings`).

    Examples:
        >>> b = [16, 64, 256, 1024, 4096]
        >>> s = [1000 * (1 + 500 / x) for x in b]
        >>> fit = fit_critical_batch(b, s, n_bootstrap=200)
        >>> round(fit.b_crit), round(fit.s_min), fit.bracketed
        (500, 1000, True)

    References:
        McCandlish et al. (2018), arXiv:1812.06162, eqs. (2.11)-(2.12), appendix A.3.
    """
    check_fit_settings(n_bootstrap=n_bootstrap, confidence=confidence, max_increase=max_increase)
    b, s, ok, (s_lo, s_hi) = _validate(batch_sizes, steps, reached, max_increase, (steps_low, steps_high))
    logb, y = np.log(b), np.log(s)
    lo, hi = float(b[ok].min()), float(b[ok].max())
    c_bounds = (np.log(lo / _SEARCH_FACTOR), np.log(hi * _SEARCH_FACTOR))

    a0, c0 = _profile_fit(y[None, :], logb, ok, c_bounds)
    a_hat, c_hat = _polish(y, logb, ok, float(a0[0]), float(c0[0]), c_bounds)
    resid, jac = _residuals(a_hat, c_hat, y, logb, ok)
    active = ok | (resid < 0)
    dof = max(int(ok.sum()) - 2, 1)
    residual_sd = float(np.sqrt(np.sum(resid**2) / dof))

    rng = np.random.default_rng(seed)
    y_star = _wild_resamples(y, ok, resid, jac, active, n_bootstrap, rng)
    y_star += _bracket_draws(s, s_lo, s_hi, ok, n_bootstrap, rng)
    # Chunks of resamples keep the [R, grid, N] work arrays near 16 MB whatever N is.
    chunk = max(1, _CHUNK_CELLS // (_COARSE_GRID * b.size))
    parts = [_profile_fit(y_star[i : i + chunk], logb, ok, c_bounds) for i in range(0, n_bootstrap, chunk)]
    a_bs, c_bs = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    # Small-sample expansion: the bootstrap treats the residual scale as known; with it
    # estimated from `dof` residuals the exact linear-Gaussian interval is t_dof/z wider.
    q = (0.5 - confidence / 2, 0.5 + confidence / 2)
    expand = stats.t.ppf(q[1], dof) / stats.norm.ppf(q[1])
    b_ci = _interval(c_hat, c_bs, q, expand)
    b_fit = float(np.exp(c_hat))
    one_sided = (1 - confidence, confidence)
    b_one_sided = _interval(c_hat, c_bs, one_sided, stats.t.ppf(confidence, dof) / stats.norm.ppf(confidence))
    bracketed, bound, bound_value = _bracket(b_fit, b_ci, b_one_sided, lo, hi)
    return CriticalBatchFit(
        s_min=float(np.exp(a_hat)),
        e_min=float(np.exp(a_hat + c_hat)),
        b_crit=b_fit if bracketed else None,
        b_crit_fit=b_fit,
        b_crit_ci=b_ci,
        s_min_ci=_interval(a_hat, a_bs, q, expand),
        e_min_ci=_interval(a_hat + c_hat, a_bs + c_bs, q, expand),
        n_points=int(b.size),
        n_censored=int((~ok).sum()),
        bracketed=bracketed,
        bound=bound,
        bound_value=bound_value,
        residual_sd=residual_sd,
        confidence=confidence,
        batch_range=(lo, hi),
    )


def check_fit_settings(*, n_bootstrap: int, confidence: float, max_increase: float = 1.5) -> None:
    """Check the settings of :func:`fit_critical_batch` before any work that needs them.

    Raises:
        ValueError: if ``n_bootstrap < MIN_BOOTSTRAP``, ``confidence`` is not in (0, 1) or
            ``max_increase`` is below 1 (or NaN); the message names the setting.
    """
    if n_bootstrap < MIN_BOOTSTRAP:
        raise ValueError(
            f"expected `n_bootstrap` >= {MIN_BOOTSTRAP} for a percentile interval but got {n_bootstrap}"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"expected `confidence` in (0, 1) but got {confidence}")
    if not max_increase >= 1.0:
        raise ValueError(
            f"expected `max_increase` >= 1 (a ratio of steps; inf turns the check off) but got {max_increase}"
        )


def _validate(
    batch_sizes: Sequence[float] | np.ndarray,
    steps: Sequence[float] | np.ndarray,
    reached: Sequence[bool] | np.ndarray | None,
    max_increase: float,
    bracket: tuple[Sequence[float] | np.ndarray | None, Sequence[float] | np.ndarray | None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Arrays sorted by batch size; raises SweepDataError with the offending values."""
    b = np.asarray(batch_sizes, dtype=float).ravel()
    s = np.asarray(steps, dtype=float).ravel()
    ok = np.ones(b.shape, bool) if reached is None else np.asarray(reached, dtype=bool).ravel()
    lo, hi = (s if v is None else np.asarray(v, dtype=float).ravel() for v in bracket)
    if not b.size == s.size == ok.size == lo.size == hi.size:
        raise SweepDataError(
            f"batch_sizes, steps, reached and the bracket have different lengths "
            f"({b.size}, {s.size}, {ok.size}, {lo.size}, {hi.size})"
        )
    for name, v in (("batch size", b), ("steps", s)):
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            raise SweepDataError(f"every {name} must be a positive number; got {v[bad][:5].tolist()}")
    values, counts = np.unique(b, return_counts=True)
    if (counts > 1).any():
        dup = ", ".join(f"{format_batch(v)} ({n} runs)" for v, n in zip(values, counts, strict=True) if n > 1)
        raise SweepDataError(
            f"batch size given more than once: {dup}; keep one run per batch size, the fastest "
            "to the goal with its tuned learning rate (McCandlish et al. 2018, appendix A.2)"
        )
    # Comparisons are written so that NaN fails them; a censored run's bracket is not used.
    held = ~ok | ((lo >= 0) & (lo <= s) & (s <= hi) & np.isfinite(hi))
    if not held.all():
        i = int(np.flatnonzero(~held)[0])
        raise SweepDataError(
            f"batch {format_batch(b[i])}: steps {s[i]:.6g} are not within their bracket "
            f"[{lo[i]:.6g}, {hi[i]:.6g}] (expected 0 <= steps_low <= steps <= steps_high < inf)"
        )
    order = np.argsort(b)
    b, s, ok, lo, hi = b[order], s[order], ok[order], lo[order], hi[order]
    if ok.sum() < 3:
        got = ", ".join(format_batch(v) for v in b[ok]) or "none: every run stopped short of it"
        raise SweepDataError(
            f"the goal was reached at {int(ok.sum())} batch size(s) ({got}); fitting S_min and "
            "B_crit needs at least 3 (runs that did not reach it only give lower bounds)"
        )
    _check_monotone(b, s, ok, max_increase)
    return b, s, ok, (lo, hi)


def _check_monotone(b: np.ndarray, s: np.ndarray, ok: np.ndarray, max_increase: float) -> None:
    """Raise when a run needs more than ``max_increase`` x the steps of a smaller batch size."""
    fewest = np.minimum.accumulate(np.where(ok, s, np.inf))  # fewest steps at B' <= B, reached runs
    prev = np.concatenate([[np.inf], fewest[:-1]])
    bad = np.flatnonzero(s > max_increase * prev)
    if bad.size:
        msgs = []
        for j in bad[:3]:
            i = int(np.flatnonzero(ok[:j] & (s[:j] == prev[j]))[0])
            verb = "needs" if ok[j] else "did not reach the goal in"
            msgs.append(
                f"batch {format_batch(b[j])} {verb} {s[j]:.6g} steps but batch {format_batch(b[i])} "
                f"reached it in {s[i]:.6g} ({s[j] / s[i]:.2f}x)"
            )
        raise SweepDataError(
            "steps increase with batch size beyond noise: " + "; ".join(msgs) + f" (tolerance "
            f"{max_increase}x). S(B) = S_min(1 + B_crit/B) cannot increase: tune the learning rate "
            "at each batch size, or drop batch sizes past the useful range"
        )


def _project(y: np.ndarray, f: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best ``a`` and objective for every (resample, grid point): ``y`` ``[R, 1, N]``, ``f`` ``[R|1, G, N]``.

    Minimises ``sum_ok (a + f - y)^2 + sum_censored min(0, a + f - y)^2`` over ``a``. Its
    derivative is concave and increasing, so Newton from the uncensored mean (the update below)
    climbs monotonically to the root and stops once the active set is stable.
    """
    d = y - f  # [R, G, N]
    a = d[..., ok].mean(-1)
    n_cens = int((~ok).sum())
    if n_cens:
        for _ in range(n_cens + 1):
            use = ok | (d > a[..., None])
            a = np.where(use, d, 0.0).sum(-1) / use.sum(-1)
    r = a[..., None] - d
    r = np.where(ok, r, np.minimum(r, 0.0))
    return a, np.einsum("...n,...n->...", r, r)


def _profile_fit(
    y: np.ndarray, logb: np.ndarray, ok: np.ndarray, c_bounds: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``(log S_min, log B_crit)`` of each row of ``y`` ``[R, N]``: two ``[R]`` arrays."""
    c_lo, c_hi = c_bounds
    grid = np.linspace(c_lo, c_hi, _COARSE_GRID)
    h = grid[1] - grid[0]
    f = np.logaddexp(0.0, grid[:, None] - logb[None, :])[None]  # log(1 + B_crit/B), [1, G, N]
    _, obj = _project(y[:, None, :], f, ok)
    c_best = grid[np.argmin(obj, axis=1)]  # [R]

    fine = c_best[:, None] + np.linspace(-h, h, _FINE_GRID)[None, :]  # [R, F]
    fine = np.clip(fine, c_lo, c_hi)
    f = np.logaddexp(0.0, fine[..., None] - logb)  # [R, F, N]
    _, obj = _project(y[:, None, :], f, ok)
    k = np.clip(np.argmin(obj, axis=1), 1, _FINE_GRID - 2)
    rows = np.arange(y.shape[0])
    o_m, o_0, o_p = obj[rows, k - 1], obj[rows, k], obj[rows, k + 1]
    curv = o_m - 2 * o_0 + o_p
    step = np.where(curv > 0, 0.5 * (o_m - o_p) / np.where(curv > 0, curv, 1.0), 0.0)
    dh = fine[rows, k + 1] - fine[rows, k]
    c = np.clip(fine[rows, k] + np.clip(step, -1, 1) * dh, c_lo, c_hi)
    f = np.logaddexp(0.0, c[:, None, None] - logb)  # [R, 1, N]
    a, _ = _project(y[:, None, :], f, ok)
    return _gauss_newton(y, logb, ok, a[:, 0], c, c_bounds)


def _gauss_newton(
    y: np.ndarray,
    logb: np.ndarray,
    ok: np.ndarray,
    a: np.ndarray,
    c: np.ndarray,
    c_bounds: tuple[float, float],
    iters: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """A few joint Gauss-Newton steps on ``[R]`` estimates; a step is kept only if it helps."""

    def resid(a: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = a[:, None] + np.logaddexp(0.0, c[:, None] - logb) - y
        return np.where(ok, r, np.minimum(r, 0.0)), ok | (r < 0)

    r, active = resid(a, c)
    obj = np.einsum("rn,rn->r", r, r)
    for _ in range(iters):
        ja = active * 1.0
        jc = active / (1.0 + np.exp(logb - c[:, None]))
        saa, sac, scc = ja.sum(1), (ja * jc).sum(1), (jc * jc).sum(1)
        ga, gc = (ja * r).sum(1), (jc * r).sum(1)
        det = saa * scc - sac**2
        good = det > 1e-12 * np.maximum(saa * scc, 1e-300)
        det = np.where(good, det, 1.0)
        da = np.where(good, -(scc * ga - sac * gc) / det, 0.0)
        dc = np.where(good, -(saa * gc - sac * ga) / det, 0.0)
        a_new, c_new = a + da, np.clip(c + dc, *c_bounds)
        r_new, active_new = resid(a_new, c_new)
        obj_new = np.einsum("rn,rn->r", r_new, r_new)
        take = obj_new < obj
        a, c, obj = np.where(take, a_new, a), np.where(take, c_new, c), np.where(take, obj_new, obj)
        r, active = np.where(take[:, None], r_new, r), np.where(take[:, None], active_new, active)
    return a, c


def _residuals(
    a: float, c: float, y: np.ndarray, logb: np.ndarray, ok: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Residuals (one-sided for censored runs) ``[N]`` and their Jacobian ``[N, 2]`` in (a, c)."""
    r = a + np.logaddexp(0.0, c - logb) - y
    r = np.where(ok, r, np.minimum(r, 0.0))
    active = ok | (r < 0)
    dfdc = 1.0 / (1.0 + np.exp(logb - c))  # d log(1 + e^c/B) / dc
    jac = np.stack([active * 1.0, active * dfdc], axis=1)
    return r, jac


def _polish(
    y: np.ndarray, logb: np.ndarray, ok: np.ndarray, a0: float, c0: float, c_bounds: tuple[float, float]
) -> tuple[float, float]:
    """Refine the grid estimate with scipy's trust-region least squares (bounded log B_crit)."""
    c_lo, c_hi = c_bounds
    sol = optimize.least_squares(
        lambda p: _residuals(p[0], p[1], y, logb, ok)[0],
        x0=[a0, float(np.clip(c0, c_lo + 1e-9, c_hi - 1e-9))],
        jac=lambda p: _residuals(p[0], p[1], y, logb, ok)[1],
        bounds=([-np.inf, c_lo], [np.inf, c_hi]),
        xtol=1e-12,
        ftol=1e-12,
        gtol=1e-12,
    )
    return float(sol.x[0]), float(sol.x[1])


def _wild_resamples(
    y: np.ndarray,
    ok: np.ndarray,
    resid: np.ndarray,
    jac: np.ndarray,
    active: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``[R, N]`` log-steps: fitted values plus HC3-scaled residuals with random signs."""
    j = jac[active]
    lev = np.zeros_like(resid)
    lev[active] = np.einsum("ij,jk,ik->i", j, np.linalg.pinv(j.T @ j), j)
    scaled = resid / (1.0 - np.minimum(lev, _MAX_LEVERAGE))
    fitted = y + resid
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_bootstrap, y.size))
    return np.where(ok, fitted + signs * scaled, y)


def _bracket_draws(
    s: np.ndarray, lo: np.ndarray, hi: np.ndarray, ok: np.ndarray, n_bootstrap: int, rng: np.random.Generator
) -> np.ndarray:
    """``[R, N]`` offsets ``log u - log s``, ``u`` uniform in each bracket (from at least 1 step).

    Zero for censored runs and for crossings known exactly (``lo == hi``).
    """
    out = np.zeros((n_bootstrap, s.size))
    wide = ok & (hi > lo)
    if wide.any():
        low = np.maximum(lo[wide], np.minimum(1.0, hi[wide]))
        u = rng.uniform(low, hi[wide], size=(n_bootstrap, int(wide.sum())))
        out[:, wide] = np.log(u) - np.log(s[wide])
    return out


def _interval(est: float, boot: np.ndarray, q: tuple[float, float], expand: float) -> tuple[float, float]:
    """Percentile interval of ``exp(boot)``, its distances from ``est`` (log scale) scaled by ``expand``.

    It is widened to contain the estimate, which a percentile interval can miss when the estimate
    sits on the search boundary of an unbracketed sweep.
    """
    lo, hi = est + expand * (np.quantile(boot, q) - est)
    return float(np.exp(min(lo, est))), float(np.exp(max(hi, est)))


def _bracket(
    b_fit: float,
    b_ci: tuple[float, float],
    b_one_sided: tuple[float, float],
    lo: float,
    hi: float,
) -> tuple[bool, str | None, float | None]:
    """Whether the sweep brackets B_crit and, if not, the one-sided bound it supports.

    ``b_one_sided`` holds the lower and upper one-sided limits at the confidence level.
    """
    open_high = b_fit > hi or b_ci[1] > hi * _BRACKET_SLACK
    open_low = b_fit < lo or b_ci[0] < lo / _BRACKET_SLACK
    if not (open_high or open_low):
        return True, None, None
    if open_high and not open_low:
        # A bound never claims more than the grid shows: capped at the largest batch size.
        text = format_batch(min(b_one_sided[0], hi), "down")
        return False, f"B_crit > {text}", float(text)
    if open_low and not open_high:
        text = format_batch(max(b_one_sided[1], lo), "up")
        return False, f"B_crit < {text}", float(text)
    return False, None, None
