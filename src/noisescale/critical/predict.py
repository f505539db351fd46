"""Predictions from a critical batch size: steps, examples, speed-up, the best batch size.

With ``S(B) = S_min (1 + B_crit/B)`` and ``E(B) = B S(B) = E_min (1 + B/B_crit)``,
``E_min = S_min B_crit`` (McCandlish et al. 2018, eqs. 2.11-2.12):

* going from ``B_1`` to ``B_2`` divides the steps by ``(1 + B_crit/B_1)/(1 + B_crit/B_2)``
  and multiplies the examples by ``(B_2/B_1)`` times the steps ratio;
* the batch that minimises the cost ``E + r S`` (``r``: examples one step is worth) solves
  ``E_min/B_crit = r S_min B_crit/B^2``, i.e. ``B = sqrt(r B_crit)`` (section 2.3);
* across loss targets, ``B_crit(L) = B* / L^(1/alpha_B)`` (Kaplan et al. 2020, eq. 5.3), and a
  run at batch ``B`` relates to the minimum steps and compute through
  ``S_min = S/(1 + B_crit/B)`` and ``C_min = C/(1 + B/B_crit)`` (eqs. 5.4-5.5);
* compute is ``C = F E`` for ``F`` FLOPs per example (:func:`noisescale.flops.flops_per_example`),
  in PF-days of :data:`PF_DAY` FLOPs, and ``C/C_min = E/E_min = 1 + B/B_crit``;
* plain SGD's best learning rate at a batch size is ``eps_opt(B) = eps_max/(1 + B_noise/B)``
  (McCandlish et al. eq. 2.6; ``eps_max`` and ``B_noise`` from :func:`noisescale.estimate_b_noise`).

Batch sizes are in the user's unit (examples, or tokens for language models).

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    eqs. (2.6), (2.11)-(2.12) and section 2.3.
    Kaplan et al. (2020), Scaling Laws for Neural Language Models, arXiv:2001.08361, eqs. 5.3-5.5.
    OpenAI (2018), AI and Compute: one PF-day is 10^15 FLOP/s for a day.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, overload

import numpy as np

from noisescale._format import format_batch
from noisescale.errors import SweepDataError

if TYPE_CHECKING:  # the table needs pandas, from the `cli` extra; the rest of the module does not
    import pandas as pd

__all__ = [
    "PF_DAY",
    "BCritPowerLaw",
    "b_crit_at_loss",
    "compute_min",
    "examples_at",
    "fit_b_crit_power_law",
    "learning_rate_at",
    "optimal_batch_for_exchange_rate",
    "predict_batches",
    "speedup",
    "steps_at",
    "steps_min",
    "tradeoff_sentence",
]

ArrayLike = float | Sequence[float] | np.ndarray  # scalars in, a float out (the overloads say so)
PF_DAY = 1e15 * 86_400
"""FLOPs in one PF-day: 10^15 FLOP/s for 86,400 s (OpenAI, "AI and Compute")."""


def _positive(name: str, value: ArrayLike) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(f"expected `{name}` to be positive and finite but got {value}")
    return arr


def _out(x: np.ndarray) -> float | np.ndarray:
    return float(x) if x.ndim == 0 else x


@overload
def steps_at(batch_size: float, s_min: float, b_crit: float) -> float: ...


@overload
def steps_at(batch_size: ArrayLike, s_min: float, b_crit: float) -> float | np.ndarray: ...


def steps_at(batch_size: ArrayLike, s_min: float, b_crit: float) -> float | np.ndarray:
    """Steps to the goal at a batch size, ``S = S_min (1 + B_crit/B)`` (eq. 2.11).

    Args:
        batch_size: batch size(s) ``B``, in examples (or tokens).
        s_min: minimum number of steps (B -> infinity).
        b_crit: critical batch size, same unit as ``batch_size``.

    Returns:
        Steps, a float or an array shaped like ``batch_size``.

    Raises:
        ValueError: if an argument is not positive and finite.

    Examples:
        >>> steps_at(500.0, s_min=1000.0, b_crit=500.0)
        2000.0
    """
    b = _positive("batch_size", batch_size)
    return _out(_positive("s_min", s_min) * (1.0 + _positive("b_crit", b_crit) / b))


@overload
def examples_at(batch_size: float, e_min: float, b_crit: float) -> float: ...


@overload
def examples_at(batch_size: ArrayLike, e_min: float, b_crit: float) -> float | np.ndarray: ...


def examples_at(batch_size: ArrayLike, e_min: float, b_crit: float) -> float | np.ndarray:
    """Examples to the goal at a batch size, ``E = E_min (1 + B/B_crit)`` (eq. 2.11).

    ``E_min = S_min B_crit``; pass ``s_min * b_crit`` when only ``S_min`` is known.

    Args:
        batch_size: batch size(s) ``B``, in examples (or tokens).
        e_min: minimum number of examples (B -> 0), in the same unit.
        b_crit: critical batch size.

    Returns:
        Examples (or tokens), a float or an array shaped like ``batch_size``.

    Raises:
        ValueError: if an argument is not positive and finite.

    Examples:
        >>> examples_at(500.0, e_min=5e5, b_crit=500.0)
        1000000.0
    """
    b = _positive("batch_size", batch_size)
    return _out(_positive("e_min", e_min) * (1.0 + b / _positive("b_crit", b_crit)))


@overload
def speedup(batch_size: float, reference: float, b_crit: float) -> float: ...


@overload
def speedup(batch_size: ArrayLike, reference: float, b_crit: float) -> float | np.ndarray: ...


def speedup(batch_size: ArrayLike, reference: float, b_crit: float) -> float | np.ndarray:
    """Steps at ``reference`` divided by steps at ``batch_size``: ``(1 + B_crit/B_ref)/(1 + B_crit/B)``.

    Args:
        batch_size: batch size(s) ``B``, in examples (or tokens).
        reference: batch size the speed-up is measured against.
        b_crit: critical batch size.

    Returns:
        Speed-up in steps (> 1 when ``B > reference``).

    Raises:
        ValueError: if an argument is not positive and finite.

    Examples:
        >>> speedup(1024.0, 512.0, b_crit=512.0)
        1.3333333333333333
    """
    b, ref = _positive("batch_size", batch_size), _positive("reference", reference)
    bc = _positive("b_crit", b_crit)
    return _out((1.0 + bc / ref) / (1.0 + bc / b))


def _verb(ratio: float) -> str:
    named = {2.0: "doubling", 4.0: "quadrupling", 0.5: "halving", 0.25: "quartering"}
    for value, word in named.items():
        if abs(ratio / value - 1) < 1e-9:
            return word
    return "raising" if ratio > 1 else "lowering"


def tradeoff_sentence(b_from: float, b_to: float, b_crit: float, *, unit: str = "examples") -> str:
    """One sentence on what changing the batch size costs and gains, percentages rounded.

    Steps scale by ``(1 + B_crit/b_to)/(1 + B_crit/b_from)`` and examples by ``b_to/b_from``
    times that (eq. 2.11).

    Args:
        b_from: current batch size, in ``unit``.
        b_to: new batch size.
        b_crit: critical batch size.
        unit: word for the batch unit ("examples" or "tokens").

    Returns:
        e.g. "doubling the batch from 512 to 1024 cuts steps by 31% and costs 38% more examples".

    Raises:
        ValueError: if a batch size is not positive or ``b_from == b_to``.

    Examples:
        >>> tradeoff_sentence(512, 1024, b_crit=835)
        'doubling the batch from 512 to 1024 cuts steps by 31% and costs 38% more examples'
        >>> tradeoff_sentence(1024, 512, b_crit=835)
        'halving the batch from 1024 to 512 adds 45% more steps and saves 28% of examples'
    """
    b0, b1, bc = (float(_positive(n, v)) for n, v in (("b_from", b_from), ("b_to", b_to), ("b_crit", b_crit)))
    if b0 == b1:
        raise ValueError(f"expected two different batch sizes but got {b0} twice")
    steps_ratio = (1 + bc / b1) / (1 + bc / b0)
    examples_ratio = steps_ratio * b1 / b0
    head = f"{_verb(b1 / b0)} the batch from {format_batch(b0)} to {format_batch(b1)}"
    if b1 > b0:
        return (
            f"{head} cuts steps by {round(100 * (1 - steps_ratio))}% and costs "
            f"{round(100 * (examples_ratio - 1))}% more {unit}"
        )
    return (
        f"{head} adds {round(100 * (steps_ratio - 1))}% more steps and saves "
        f"{round(100 * (1 - examples_ratio))}% of {unit}"
    )


def optimal_batch_for_exchange_rate(exchange_rate: float, b_crit: float) -> float:
    r"""Batch size minimising ``E + r S`` for an exchange rate ``r``: ``B = sqrt(r B_crit)``.

    .. math::

        \frac{d}{dB}\left[E_{min}(1 + B/B_{crit}) + r S_{min}(1 + B_{crit}/B)\right] = 0
        \;\Rightarrow\; B^2 = r B_{crit}^2 S_{min}/E_{min} = r B_{crit},

    independent of ``S_min`` because ``E_min = S_min B_crit``.

    Args:
        exchange_rate: ``r``, how many examples (or tokens) one step is worth.
        b_crit: critical batch size, same unit.

    Returns:
        The cheapest constant batch size.

    Raises:
        ValueError: if an argument is not positive and finite.

    Examples:
        >>> optimal_batch_for_exchange_rate(1000.0, 1000.0)
        1000.0

    References:
        McCandlish et al. (2018), arXiv:1812.06162, section 2.3 (and appendix D for the
        adaptive form ``B(s) = sqrt(r B_noise(s))``).
    """
    return float(np.sqrt(_positive("exchange_rate", exchange_rate) * _positive("b_crit", b_crit)))


@overload
def steps_min(steps: float, batch_size: float, b_crit: float) -> float: ...


@overload
def steps_min(steps: ArrayLike, batch_size: ArrayLike, b_crit: float) -> float | np.ndarray: ...


def steps_min(steps: ArrayLike, batch_size: ArrayLike, b_crit: float) -> float | np.ndarray:
    """Minimum steps from a run at batch ``B``: ``S_min = S/(1 + B_crit/B)`` (Kaplan et al. eq. 5.4).

    Args:
        steps: steps the run took.
        batch_size: its batch size.
        b_crit: critical batch size at the run's loss.

    Returns:
        ``S_min``, in steps.

    Raises:
        ValueError: if an argument is not positive and finite.
    """
    s, b = _positive("steps", steps), _positive("batch_size", batch_size)
    return _out(s / (1.0 + _positive("b_crit", b_crit) / b))


@overload
def compute_min(compute: float, batch_size: float, b_crit: float) -> float: ...


@overload
def compute_min(compute: ArrayLike, batch_size: ArrayLike, b_crit: float) -> float | np.ndarray: ...


def compute_min(compute: ArrayLike, batch_size: ArrayLike, b_crit: float) -> float | np.ndarray:
    """Minimum compute from a run at batch ``B``: ``C_min = C/(1 + B/B_crit)`` (Kaplan et al. eq. 5.5).

    Args:
        compute: compute the run used (any unit, e.g. PF-days or FLOPs).
        batch_size: its batch size.
        b_crit: critical batch size at the run's loss.

    Returns:
        ``C_min`` in the unit of ``compute``.

    Raises:
        ValueError: if an argument is not positive and finite.

    Examples:
        >>> compute_min(2.0, 1000.0, 1000.0)
        1.0
    """
    c, b = _positive("compute", compute), _positive("batch_size", batch_size)
    return _out(c / (1.0 + b / _positive("b_crit", b_crit)))


@overload
def learning_rate_at(batch_size: float, eps_max: float, b_noise: float) -> float: ...


@overload
def learning_rate_at(batch_size: ArrayLike, eps_max: float, b_noise: float) -> float | np.ndarray: ...


def learning_rate_at(batch_size: ArrayLike, eps_max: float, b_noise: float) -> float | np.ndarray:
    """Plain SGD's optimal learning rate at a batch size, ``eps_max/(1 + B_noise/B)`` (eq. 2.6).

    Linear in ``B`` while ``B << B_noise``, flat at ``eps_max`` beyond. It is the best step of the
    local quadratic model at the point where ``eps_max = |G|^2/(G^T H G)`` and ``B_noise`` were
    measured (:func:`noisescale.estimate_b_noise`); both move as training goes on.

    Args:
        batch_size: batch size(s) ``B``, in the unit of ``b_noise`` (examples or tokens).
        eps_max: the best learning rate of an infinite batch.
        b_noise: ``tr(H Sigma)/(G^T H G)`` (eq. 2.8).

    Returns:
        Learning rate(s), a float or an array shaped like ``batch_size``.

    Raises:
        ValueError: if an argument is not positive and finite.

    Examples:
        >>> round(learning_rate_at(16.0, eps_max=0.4519434, b_noise=7.140705), 6)  # SCIENCE.md's oracle
        0.312484
    """
    b = _positive("batch_size", batch_size)
    return _out(_positive("eps_max", eps_max) / (1.0 + _positive("b_noise", b_noise) / b))


class BCritPowerLaw(NamedTuple):
    """``B_crit(L) = b_star / L^(1/alpha_b)`` (Kaplan et al. 2020, eq. 5.3)."""

    b_star: float  # examples (tokens in Kaplan et al.: ~2e8), B_crit at L = 1
    alpha_b: float  # dimensionless (~0.21 for language models)

    def doubling_drop(self) -> float:
        """Fractional loss drop over which B_crit doubles, ``1 - 2^(-alpha_b)`` (13% for 0.21)."""
        return 1.0 - 2.0 ** (-self.alpha_b)


@overload
def b_crit_at_loss(loss: float, b_star: float, alpha_b: float) -> float: ...


@overload
def b_crit_at_loss(loss: ArrayLike, b_star: float, alpha_b: float) -> float | np.ndarray: ...


def b_crit_at_loss(loss: ArrayLike, b_star: float, alpha_b: float) -> float | np.ndarray:
    """Critical batch size at a loss target, ``B* / L^(1/alpha_B)`` (Kaplan et al. 2020, eq. 5.3).

    Args:
        loss: loss target(s) ``L`` (in the loss unit the law was fitted in, e.g. nats).
        b_star: ``B*``, in examples (or tokens).
        alpha_b: exponent ``alpha_B``.

    Returns:
        ``B_crit(L)`` in the unit of ``b_star``.

    Raises:
        ValueError: if an argument is not positive and finite.

    Examples:
        >>> round(b_crit_at_loss(2.0, b_star=2e8, alpha_b=0.21) / 1e6, 1)
        7.4
    """
    inv_alpha = 1.0 / _positive("alpha_b", alpha_b)
    return _out(_positive("b_star", b_star) / _positive("loss", loss) ** inv_alpha)


def fit_b_crit_power_law(losses: ArrayLike, b_crits: ArrayLike) -> BCritPowerLaw:
    """Fit ``B_crit(L) = B* / L^(1/alpha_B)`` by least squares on ``log B_crit`` vs ``log L``.

    Args:
        losses: loss targets ``[G]`` (positive, e.g. cross-entropy in nats).
        b_crits: fitted critical batch sizes at those targets ``[G]``.

    Returns:
        BCritPowerLaw(b_star, alpha_b).

    Raises:
        SweepDataError: with fewer than 3 distinct targets, non-positive values, or when
            B_crit does not grow as the loss target falls (then eq. 5.3 does not apply).

    Examples:
        >>> losses = [4.0, 3.0, 2.0]
        >>> law = fit_b_crit_power_law(losses, [b_crit_at_loss(x, 2e8, 0.21) for x in losses])
        >>> f"{law.b_star:.3g} {law.alpha_b:.3g}"
        '2e+08 0.21'

    References:
        Kaplan et al. (2020), arXiv:2001.08361, eq. 5.3.
    """
    x, y = np.asarray(losses, dtype=float).ravel(), np.asarray(b_crits, dtype=float).ravel()
    if x.size != y.size:
        raise SweepDataError(f"got {x.size} losses but {y.size} critical batch sizes")
    if not (np.all(np.isfinite(x) & (x > 0)) and np.all(np.isfinite(y) & (y > 0))):
        raise SweepDataError("the power law B_crit(L) = B*/L^(1/alpha_B) needs positive losses and B_crit")
    if np.unique(x).size < 3:
        raise SweepDataError(
            f"the power law B_crit(L) needs B_crit at 3 or more loss targets; got {np.unique(x).size}"
        )
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    if slope >= 0:
        raise SweepDataError(
            f"B_crit does not grow as the loss target falls (log-log slope {slope:.3g} >= 0), "
            "so B_crit(L) = B*/L^(1/alpha_B) (Kaplan et al. 2020, eq. 5.3) does not describe it"
        )
    return BCritPowerLaw(b_star=float(np.exp(intercept)), alpha_b=float(-1.0 / slope))


def predict_batches(
    batch_sizes: ArrayLike,
    *,
    b_crit: float,
    s_min: float | None = None,
    reference: float | None = None,
    learning_rate: tuple[float, float] | None = None,
    flops_per_example: float | None = None,
    throughput: float | None = None,
    devices: int = 1,
) -> pd.DataFrame:
    """Table of predictions at several batch sizes.

    Args:
        batch_sizes: batch sizes ``[K]``, in examples (or tokens).
        b_crit: critical batch size.
        s_min: minimum steps; without it ``steps``, ``examples``, ``flops``, ``pf_days`` and
            ``time_s`` are NaN.
        reference: batch size for the speed-up column; default the smallest of ``batch_sizes``.
        learning_rate: ``(eps_max, b_noise)``: adds ``lr``, :func:`learning_rate_at` (eq. 2.6).
        flops_per_example: FLOPs of one example's forward and backward: adds ``flops`` (``F E``),
            ``pf_days`` (``F E`` / :data:`PF_DAY`) and ``compute_ratio`` (``C/C_min = E/E_min =
            1 + B/B_crit``, Kaplan et al. eq. 5.5).
        throughput: examples per second of one device: adds ``time_s``, the seconds ``E`` examples
            take on ``devices`` devices in data parallel, assuming each keeps this throughput at a
            share ``B/devices`` of the batch and communication is free.
        devices: devices sharing each batch (>= 1).

    Returns:
        DataFrame sorted by batch size with columns ``batch_size``, ``steps``, ``examples``,
        ``speedup`` (steps at ``reference`` / steps) and ``efficiency`` (``E_min/E =
        1/(1 + B/B_crit)``, the fraction of the examples that a tiny batch would need), then the
        optional columns above.

    Raises:
        ValueError: if a value is not positive and finite.

    Examples:
        >>> predict_batches([500, 1000], b_crit=500, s_min=1000)[["steps", "speedup", "efficiency"]].round(3)
            steps  speedup  efficiency
        0  2000.0    1.000       0.500
        1  1500.0    1.333       0.333
    """
    import pandas as pd  # the `cli` extra: the core (pip install noisescale) installs without it

    b = np.sort(np.atleast_1d(_positive("batch_sizes", batch_sizes)))
    ref = float(b[0]) if reference is None else reference
    nan = np.full(b.shape, np.nan)
    examples = nan if s_min is None else examples_at(b, s_min * b_crit, b_crit)
    columns = {
        "batch_size": b,
        "steps": nan if s_min is None else steps_at(b, s_min, b_crit),
        "examples": examples,
        "speedup": speedup(b, ref, b_crit),
        "efficiency": 1.0 / (1.0 + b / b_crit),
    }
    if learning_rate is not None:
        columns["lr"] = learning_rate_at(b, *learning_rate)
    if flops_per_example is not None:
        columns["flops"] = examples * _positive("flops_per_example", flops_per_example)
        columns["pf_days"] = columns["flops"] / PF_DAY
        columns["compute_ratio"] = examples_at(b, 1.0, b_crit)  # E/E_min, with E_min = 1
    if throughput is not None:
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ValueError(f"expected `devices` to be an integer >= 1 but got {devices!r}")
        columns["time_s"] = examples / (_positive("throughput", throughput) * devices)
    return pd.DataFrame(columns)
