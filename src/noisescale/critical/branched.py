r"""The branched-training test of the critical batch size (Merrill et al. 2025), on logged curves.

From one checkpoint of a run at batch size ``B``, branches train at ``kappa B``
(``kappa = 1, 2, 4, ...``) for the same window of ``W`` examples, each evaluated at the same
examples ``0 = e_0 < e_1 < ... < e_n = W``. Their losses are smoothed and compared *at equal
examples*: branch ``kappa`` keeps up with a smaller branch ``j`` when its smoothed loss at the
end of the window is within a tolerance of branch ``j``'s. The critical batch size at the
checkpoint is ``B* = kappa* B`` with ``kappa*`` the largest ``kappa`` that keeps up with *every*
smaller one (Merrill et al. 2025, section 3.1; ``kappa = 1`` trivially does).

Smoothing (the paper: an EMA of the loss with ``alpha = 0.5``): the EMA over the checks,
``s_i = alpha l_i + (1 - alpha) s_{i-1}`` from ``s_0 = l_0`` (the checkpoint's loss), is a
weighted mean of the losses; it is placed at the same weighted mean of their examples (its
centroid), so a curve that is linear in examples is smoothed exactly and every branch, evaluated
at the same examples, lags by the same amount.

Two tolerances:

* ``"loss"`` (the paper's): ``s_kappa(W) <= s_j(W) + epsilon`` (``epsilon = 0.01`` nats for
  OLMo). It depends on the loss scale and on the window.
* ``"examples"`` (the default): the *examples ratio* ``rho`` of the two branches at the loss
  they reach, ``rho = W / e_j`` with ``e_j`` the examples branch ``j`` needed to reach
  ``s_kappa(W)`` (read off its smoothed curve with the one crossing rule of
  :mod:`noisescale.critical.goals`; when branch ``kappa`` is ahead, ``rho < 1`` from its own
  curve at ``s_j(W)``); it keeps up when ``rho <= 1 + tau``. On the steps-examples hyperbola
  ``E(B) = E_min (1 + B/B_crit)`` (McCandlish et al. 2018, eq. 2.11)
  ``rho = (1 + kappa B/B_crit) / (1 + j B/B_crit)``, so branch ``kappa`` keeps up with ``j = 1``
  exactly when ``kappa B <= tau B_crit + (1 + tau) B``: with ``tau = 1`` the test finds the
  largest ``kappa B`` of the grid at or below ``B_crit + 2B``, the batch at which training
  needs twice the examples, the definition of ``B_crit``. ``B*`` is a value of the grid.

Uncertainty: branches are repeated with ``R`` data streams (replicas; every ``kappa`` of one
replica draws the same examples). The test runs on the replica-mean losses; its interval
comes from resampling the replicas with replacement (all ``kappa`` together) and repeating the
test (percentile interval of the grid values). When the largest branch still keeps up the
result is a bound, ``B_crit >= kappa_max B``; when not even ``kappa = 2`` does, ``B_crit <= B``
(the grid cannot see below the base batch). When the base batch itself made no progress over
the window (its smoothed loss did not fall below the checkpoint's: a run at its noise floor)
there is nothing to keep up with, and the result is neither a value nor a bound but a note.

Cumulative B_crit (what a sweep measures): the value at a point is *local*, the trade-off over
the window after it, while a sweep's ``B_crit(L) = E_min(L)/S_min(L)`` is a ratio of totals
from initialisation to the loss ``L``. With branch points ``0 = x_0 < x_1 < ... < x_n`` (the
base run's examples) and the local value ``b_i`` taken for the segment ``[x_i, x_{i+1})`` that
its branches trained over, eq. 2.11 per segment gives the base run's examples there,
``dE_i = dE_min,i (1 + B/b_i)``, and ``dS_min,i = dE_min,i / b_i``; a run at any batch ``B'``
then needs ``E(B') = sum_i dE_min,i (1 + B'/b_i) = E_min (1 + B'/B_crit)`` with

.. math::

    B_{crit}(x) = \frac{\sum_i \Delta E_{min,i}}{\sum_i \Delta S_{min,i}}
                = \frac{\sum_i \Delta E_i\, b_i/(b_i + B)}{\sum_i \Delta E_i/(b_i + B)},

the ``dE_min``-weighted harmonic mean of the local values: exactly the hyperbola a sweep fits
(:func:`cumulative_b_crit`). It increases with every ``b_i``, so a local bound gives a bound.

References:
    Merrill, Arora, Groeneveld & Hajishirzi (2025), Critical Batch Size Revisited: A Simple
    Empirical Approach to Large-Batch Language Model Training, arXiv:2505.23971, section 3.1.
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    eqs. (2.11)-(2.12).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from noisescale._format import format_batch
from noisescale.critical.goals import crossing
from noisescale.errors import SweepDataError

__all__ = [
    "TOLERANCE_KINDS",
    "BranchTest",
    "BranchedCritical",
    "CumulativeCritical",
    "branch_test",
    "check_branch_grid",
    "cumulative_b_crit",
    "cumulative_chain",
    "decide",
    "examples_ratio",
    "smooth",
]

TOLERANCE_KINDS = ("examples", "loss")


def check_branch_grid(kappas: Sequence[int]) -> tuple[int, ...]:
    """The multipliers as a tuple, or a ValueError naming the fix.

    Raises:
        ValueError: unless they are at least two increasing integers starting at 1.
    """
    values = tuple(kappas)
    if len(values) < 2 or any(not isinstance(k, int) or isinstance(k, bool) for k in values):
        raise ValueError(
            f"expected at least two integer multipliers kappa (1, 2, 4, ...) but got {list(values)}"
        )
    if values[0] != 1 or any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(
            f"the multipliers kappa must increase and start at 1 (the base batch, the reference), "
            f"e.g. 1 2 4 8; got {list(values)}"
        )
    return values


def smooth(examples: Sequence[float], losses: Sequence[float], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """EMA of a curve over its checks, each value placed at the centroid of the examples it averages.

    Args:
        examples: ``[T]`` examples at the checks, ``examples[0] = 0`` (the checkpoint).
        losses: ``[T]`` losses there; a non-finite value (a diverged branch) makes every later
            smoothed value infinite.
        alpha: weight of the newest check, in (0, 1]; 1 leaves the curve as it is.

    Returns:
        ``(centroids [T], smoothed [T])``.

    Example:
        >>> c, s = smooth([0, 10, 20], [3.0, 2.0, 1.0], 0.5)  # a line stays on its line
        >>> c.tolist(), s.tolist()
        ([0.0, 5.0, 12.5], [3.0, 2.5, 1.75])
    """
    e = np.asarray(examples, dtype=np.float64)
    loss = np.array([math.inf if v is None else v for v in losses], dtype=np.float64)
    bad = ~np.isfinite(loss)
    first_bad = int(bad.argmax()) if bad.any() else len(e)
    c, s = np.empty_like(e), np.full_like(e, math.inf)
    c[0], s[0] = e[0], loss[0]
    for i in range(1, len(e)):
        c[i] = alpha * e[i] + (1 - alpha) * c[i - 1]
        if i < first_bad:
            s[i] = alpha * loss[i] + (1 - alpha) * s[i - 1]
    return c, s


def _examples_to(centroids: np.ndarray, curve: np.ndarray, level: float) -> float:
    """Examples a smoothed curve needs to reach ``level``: 0 if it starts there, inf if never."""
    try:
        hit = crossing(centroids.tolist(), curve.tolist(), level)
    except SweepDataError:  # met at the checkpoint itself
        return 0.0
    return hit.steps if hit.reached else math.inf


def examples_ratio(centroids: np.ndarray, larger: np.ndarray, smaller: np.ndarray) -> float:
    """``rho``: examples the larger branch needs over those the smaller needs, to reach the same loss.

    Args:
        centroids: ``[T]`` positions of the smoothed values (:func:`smooth`).
        larger: ``[T]`` smoothed curve of the branch at the larger batch.
        smaller: ``[T]`` smoothed curve of the branch at the smaller batch.

    Returns:
        ``W / e_smaller`` (>= 1) when the larger branch ends at a higher loss; ``e_larger / W``
        (< 1) when it ends lower; inf when the larger branch made no progress or diverged while
        the smaller did not; 0 when the smaller made none.

    Example:
        >>> c = np.array([0.0, 50.0, 100.0])
        >>> examples_ratio(c, np.array([3.0, 2.5, 2.0]), np.array([3.0, 2.0, 1.0]))  # 2.0 at 50
        2.0
    """
    end, lk, lj = float(centroids[-1]), float(larger[-1]), float(smaller[-1])
    if not math.isfinite(lk):
        return math.inf if math.isfinite(lj) else math.nan
    if lk >= lj:
        needed = _examples_to(centroids, smaller, lk)
        return end / needed if needed > 0 else math.inf
    return _examples_to(centroids, larger, lj) / end


class BranchTest(NamedTuple):
    """The test on one set of smoothed curves."""

    kappa_index: int  # index of kappa* in the grid
    keeps_up: tuple[bool, ...]  # [K] whether each branch keeps up with every smaller one
    versus_base: tuple[float, ...]  # [K] rho against kappa = 1 ("examples") or excess loss ("loss")
    final_loss: tuple[float, ...]  # [K] smoothed loss at the end of the window


def branch_test(centroids: np.ndarray, curves: np.ndarray, *, tolerance: float, kind: str) -> BranchTest:
    """The largest branch that keeps up with every smaller one (Merrill et al. 2025, section 3.1).

    Args:
        centroids: ``[T]`` positions of the smoothed values, examples.
        curves: ``[K, T]`` smoothed curves, in the order of the multipliers.
        tolerance: ``tau`` (``"examples"``: ``rho <= 1 + tau``) or ``epsilon`` (``"loss"``:
            ``s_kappa(W) <= s_j(W) + epsilon``).
        kind: ``"examples"`` or ``"loss"``.

    Returns:
        kappa*'s index and, per branch, whether it keeps up, its comparison with ``kappa = 1``
        and its final smoothed loss.
    """

    def compare(k: int, j: int) -> float:
        if k == j:  # a branch against itself, by definition
            return 0.0 if kind == "loss" else 1.0
        if kind == "loss":
            return float(curves[k, -1] - curves[j, -1]) if math.isfinite(curves[k, -1]) else math.inf
        return examples_ratio(centroids, curves[k], curves[j])

    limit = tolerance if kind == "loss" else 1.0 + tolerance
    ok = [True] + [all(compare(k, j) <= limit for j in range(k)) for k in range(1, len(curves))]
    star = max(i for i, good in enumerate(ok) if good)
    versus = tuple(float(compare(k, 0)) for k in range(len(curves)))
    return BranchTest(star, tuple(ok), versus, tuple(float(v) for v in curves[:, -1]))


class BranchedCritical(NamedTuple):
    """B_crit at one checkpoint from its branches; batch sizes in the task's unit."""

    b_crit: float | None  # kappa* B; None when the grid only bounds it (`bound`) or no progress (`note`)
    b_crit_ci: (
        tuple[float, float] | None
    )  # percentile interval over replica resamples; None: 1 replica or bound
    bound: str | None  # "B_crit >= 512" (the largest branch keeps up) or "B_crit <= 16" (none does)
    note: str | None  # why there is neither a value nor a bound (the base batch made no progress)
    kappa_star: int
    test: BranchTest  # on the replica-mean curves
    batch_sizes: tuple[int, ...]  # [K] kappa B
    replicas: int
    draws: tuple[float, ...] = ()  # [n_bootstrap] B_crit of each replica resample; () without an interval

    def to_dict(self, kind: str) -> dict[str, Any]:
        """JSON-ready: the result and, per branch, its batch size, loss, comparison and verdict."""
        name = "examples_ratio" if kind == "examples" else "excess_loss"
        return {
            "b_crit": self.b_crit,
            "b_crit_ci": None if self.b_crit_ci is None else list(self.b_crit_ci),
            "bound": self.bound,
            "note": self.note,
            "kappa_star": self.kappa_star,
            "replicas": self.replicas,
            "branches": [
                {"batch_size": b, "loss": loss, name: v, "keeps_up": ok}
                for b, loss, v, ok in zip(
                    self.batch_sizes,
                    self.test.final_loss,
                    self.test.versus_base,
                    self.test.keeps_up,
                    strict=True,
                )
            ],
        }


def decide(
    examples: Sequence[float],
    losses: np.ndarray,
    kappas: Sequence[int],
    batch_size: int,
    *,
    tolerance: float = 1.0,
    kind: str = "examples",
    smoothing: float = 0.5,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> BranchedCritical:
    """B_crit at a checkpoint from the losses of its branches, with an interval over replicas.

    Args:
        examples: ``[T]`` examples at the checks of every branch, ``examples[0] = 0``.
        losses: ``[R, K, T]`` losses per replica, multiplier and check (NaN/inf: diverged);
            ``losses[..., 0]`` is the checkpoint's loss.
        kappas: ``[K]`` the multipliers (increasing integers from 1).
        batch_size: ``B``, the base batch, in the task's unit.
        tolerance: ``tau`` or ``epsilon`` (see :func:`branch_test`), >= 0.
        kind: ``"examples"`` or ``"loss"``.
        smoothing: EMA weight of the newest check, in (0, 1].
        confidence: level of the interval.
        n_bootstrap: replica resamples for the interval.
        seed: seed of the resampling.

    Returns:
        BranchedCritical.

    Raises:
        ValueError: on shapes that do not match, an invalid grid, tolerance or smoothing.
    """
    grid = check_branch_grid(kappas)
    arr = np.asarray(losses, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1:] != (len(grid), len(examples)) or arr.shape[0] < 1 or len(examples) < 2:
        raise ValueError(
            f"expected losses [R, {len(grid)}, {len(examples)}] (T >= 2) but got {list(arr.shape)}"
        )
    if kind not in TOLERANCE_KINDS or not 0 <= tolerance < math.inf or not 0 < smoothing <= 1:
        raise ValueError(f"expected kind in {TOLERANCE_KINDS}, tolerance >= 0, smoothing in (0, 1]")
    arr = np.where(np.isfinite(arr), arr, math.inf)
    cache: dict[tuple[int, ...], BranchTest] = {}

    def test_of(rows: tuple[int, ...]) -> BranchTest:
        if rows not in cache:
            mean = arr[list(rows)].mean(axis=0)  # [K, T]; inf stays inf
            pairs = [smooth(examples, curve.tolist(), smoothing) for curve in mean]
            cache[rows] = branch_test(
                pairs[0][0], np.stack([s for _, s in pairs]), tolerance=tolerance, kind=kind
            )
        return cache[rows]

    r = arr.shape[0]
    main = test_of(tuple(range(r)))
    sizes = tuple(k * batch_size for k in grid)
    star = main.kappa_index
    bound = note = None
    if not main.final_loss[0] < float(arr[:, 0, 0].mean()):
        note = (
            f"the base batch {sizes[0]} made no progress over the window (loss {main.final_loss[0]:.4g} "
            f"from {float(arr[:, 0, 0].mean()):.4g}): nothing to keep up with; lengthen the window"
        )
    elif star == len(grid) - 1:
        bound = f"B_crit >= {sizes[-1]}"
    elif star == 0:
        bound = f"B_crit <= {sizes[0]}"
    ci, draws = None, list[int]()
    if bound is None and note is None and r > 1:
        rng = np.random.default_rng(seed)
        resamples = rng.integers(r, size=(n_bootstrap, r)).tolist()  # replica indices, with replacement
        draws = [sizes[test_of(tuple(sorted(rows))).kappa_index] for rows in resamples]
        tail = (1 - confidence) / 2
        ci = (
            float(np.quantile(draws, tail, method="lower")),
            float(np.quantile(draws, 1 - tail, method="higher")),
        )
    return BranchedCritical(
        b_crit=None if bound or note else float(sizes[star]),
        b_crit_ci=ci,
        bound=bound,
        note=note,
        kappa_star=grid[star],
        test=main,
        batch_sizes=sizes,
        replicas=r,
        draws=tuple(float(d) for d in draws),
    )


def cumulative_b_crit(
    starts: Sequence[float], local: Any, batch_size: float, until: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B_crit from initialisation to ``until`` examples of the base run, from local values (module docstring).

    Args:
        starts: ``[n]`` the base run's examples at the branch points, non-decreasing, ``starts[0] = 0``.
        local: ``[..., n]`` local B_crit at each point (>= 0, inf allowed), the task's unit; point
            ``i``'s value holds from ``starts[i]`` to the next point (the last one to ``until``);
            0 and inf are the limits (a segment adding no ``E_min``; one taking no ``S_min``).
        batch_size: ``B``, the base run's batch, the task's unit.
        until: examples of the base run at the end, > 0.

    Returns:
        ``(b_crit [...], e_min [...], s_min [...])``: ``E_min/S_min`` (examples), ``E_min``
        (examples) and ``S_min`` (steps) of eq. 2.11 summed over the segments.

    Raises:
        ValueError: unless the starts are finite and increase from 0, ``until`` and ``batch_size`` are
            finite and > 0, and every local value is >= 0.

    Example:
        >>> b, e, s = cumulative_b_crit([0, 100], [20.0, 60.0], 20, 300)  # 100 at 20, then 200 at 60
        >>> round(float(e), 6), round(float(s), 6), round(float(b), 6)  # 50 + 150 images, 2.5 + 2.5 steps
        (200.0, 5.0, 40.0)
    """
    x = np.asarray(starts, dtype=np.float64)
    b = np.asarray(local, dtype=np.float64)
    if x.ndim != 1 or len(x) < 1 or x[0] != 0 or np.any(np.diff(x) < 0) or b.shape[-1:] != x.shape:
        raise ValueError(
            f"expected branch points non-decreasing from 0 (branch at initialisation) and local values [..., "
            f"{len(x)}], got points {x.tolist()[:4]}... and values of shape {list(b.shape)}"
        )
    if not np.all(np.isfinite(x)) or not 0 < until < math.inf or not 0 < batch_size < math.inf:
        raise ValueError(
            f"expected finite branch points, a finite until > 0 and a finite batch_size > 0, got points "
            f"{x.tolist()[:4]}..., until {until} and batch_size {batch_size}"
        )
    if not np.all(b >= 0):
        raise ValueError(f"expected local values >= 0 (inf allowed), got {b[~(b >= 0)].tolist()[:4]}")
    ends = np.minimum(np.append(x[1:], math.inf), until)
    spent = np.clip(ends - x, 0.0, None)  # [n] the base run's examples per segment
    with np.errstate(divide="ignore"):  # 0 b: 1 + B/b is inf, the segment adds no E_min
        e_min = (spent / (1 + batch_size / b)).sum(axis=-1)  # inf b: the whole segment, no steps
        s_min = (spent / (b + batch_size)).sum(axis=-1)
        return e_min / s_min, e_min, s_min


class CumulativeCritical(NamedTuple):
    """B_crit from initialisation to a point of the base run; batch sizes in the task's unit."""

    b_crit: float | None  # E_min/S_min; None when only bounded (`bound`) or undefined (`note`)
    b_crit_ci: tuple[float, float] | None  # percentile interval over the points' replica resamples
    bound: str | None  # "B_crit >= 81.3" when a local value is a lower bound ("<=": upper)
    note: str | None  # why it is undefined
    e_min: float | None  # examples (at the bound values when `bound`)
    s_min: float | None  # steps
    bracket: tuple[float, float] | None = None  # with `bound`: the range the value lies in (cumulative_chain)


def cumulative_chain(
    starts: Sequence[float],
    points: Sequence[BranchedCritical],
    batch_size: int,
    until: float,
    *,
    confidence: float = 0.95,
) -> CumulativeCritical:
    """:func:`cumulative_b_crit` from the branch points' results, with bounds and an interval.

    The interval resamples every point's replicas independently (their data streams are
    independent) and recomputes the sum for each resample (the i-th draw of every point); the
    base run itself is one run and is not resampled. A point that only bounds its local value
    (``B_crit >= 512``) bounds the result the same way; bounds in both directions, or a point
    without a value (no progress), leave it undefined. With bounds in one direction the result
    is also bracketed: it increases with every local value, so it lies between its value at the
    bounds and its value with each bounded local value at its far end (``>=``: infinite, the
    segment taking no steps in the large-batch limit; ``<=``: zero, the segment adding no
    ``E_min``). The bracket does not include the resolved points' sampling uncertainty.

    Args:
        starts: ``[n]`` the base run's examples at the points, increasing.
        points: ``[n]`` :func:`decide`'s result at each (same ``n_bootstrap``).
        batch_size: ``B``, the task's unit.
        until: the base run's examples at the end.
        confidence: level of the interval.

    Returns:
        CumulativeCritical.
    """
    if len(points) != len(starts) or not len(starts) or not 0 <= until < math.inf:
        raise ValueError(
            f"expected one result per branch point ({len(starts)} points, {len(points)} results; at least "
            f"one) and a finite until >= 0, got until {until}"
        )
    if starts[0] != 0:
        note = (
            f"no branch point at 0 examples: the segment from initialisation to {starts[0]:g} is not measured"
        )
        return CumulativeCritical(None, None, None, note, None, None)
    used = [i for i, x in enumerate(starts) if x < until]
    if not used:
        return CumulativeCritical(None, None, None, "at initialisation: no examples yet", None, None)
    lower, upper, values, far = False, False, [], []
    for i in used:
        p = points[i]
        if p.note is not None:
            note = f"no local value at {starts[i]:g} examples (the base batch made no progress there)"
            return CumulativeCritical(None, None, None, note, None, None)
        if p.bound is not None:
            lower, upper = lower or ">" in p.bound, upper or "<" in p.bound
        values.append(p.b_crit if p.b_crit is not None else float(str(p.bound).split()[-1]))
        far.append(values[-1] if p.bound is None else math.inf if ">" in p.bound else 0.0)
    if lower and upper:
        note = "local values bounded in both directions (>= and <=): no bound on the sum"
        return CumulativeCritical(None, None, None, note, None, None)
    x = [starts[i] for i in used]
    b, e, s = (float(v) for v in cumulative_b_crit(x, values, batch_size, until))
    if lower or upper:
        end = float(cumulative_b_crit(x, far, batch_size, until)[0])
        bound = f"B_crit {'>=' if lower else '<='} {format_batch(b, 'down' if lower else 'up')}"
        return CumulativeCritical(None, None, bound, None, e, s, (b, end) if lower else (end, b))
    ci = None
    draws = [points[i].draws for i in used]
    if all(len(d) == len(draws[0]) > 0 for d in draws):
        resampled = cumulative_b_crit(x, np.array(draws).T, batch_size, until)[0]  # [n_bootstrap]
        tail = (1 - confidence) / 2
        ci = (float(np.quantile(resampled, tail)), float(np.quantile(resampled, 1 - tail)))
    return CumulativeCritical(b, ci, None, None, e, s)
