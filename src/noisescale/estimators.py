"""Unbiased estimators of |G|^2 and tr(Sigma) from squared gradient norms.

Pure tensor functions, no training-loop state. All of them are forms of the
two-batch estimator of McCandlish et al. (2018), appendix A.1:

.. math::

    |\\mathcal{G}|^2 = \\frac{B_{big}|G_{big}|^2 - B_{small}|G_{small}|^2}{B_{big} - B_{small}}
    \\qquad (A.1)

    \\mathcal{S} = \\frac{|G_{small}|^2 - |G_{big}|^2}{1/B_{small} - 1/B_{big}}
    \\qquad (A.2)

where both gradients are gradients of the MEAN loss over their examples, taken at
the same parameters, so that ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``. The k-way and
per-example forms average one (A.1, A.2) pair per small batch against the big
batch; each pair is unbiased, hence so is their mean, and with k equal
micro-batches of b examples it reduces to
``|G|^2 = (k|g_mean|^2 - m)/(k-1)``, ``tr(Sigma) = b k (m - |g_mean|^2)/(k-1)``
with ``m`` the mean of the squared micro-batch norms.

Shape letters: ``K`` small batches (micro-batches, replicas or examples),
``P`` parameter groups. Batch sizes are in the unit the loss is averaged over
(examples, tokens or observations).

Per-step values can be negative: that is noise, never clamp them before
averaging (SCIENCE.md; fairscale's AdaScale clamps and is biased).

References:
    McCandlish, Kaplan, Amodei (2018), An Empirical Model of Large-Batch
    Training, arXiv:1812.06162, appendix A.1, eqs. (A.1), (A.2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from noisescale.errors import SingleMicrobatchError

__all__ = [
    "NoiseStats",
    "effective_batch_size",
    "microbatch_stats",
    "per_example_stats",
    "two_batch_stats",
]


class NoiseStats(NamedTuple):
    """One step's unbiased estimates, per parameter group or in total.

    Attributes:
        grad_norm_sq: estimate of |G|^2, shape ``[P]`` or ``[]``; unit: squared loss
            units per squared parameter unit. May be negative (noise).
        trace_sigma: estimate of tr(Sigma), the trace of the per-example gradient
            covariance, same shape; may be negative (noise).
    """

    grad_norm_sq: torch.Tensor
    trace_sigma: torch.Tensor


def two_batch_stats(
    sq_norm_small: torch.Tensor,
    b_small: torch.Tensor | float,
    sq_norm_big: torch.Tensor,
    b_big: torch.Tensor | float,
) -> NoiseStats:
    """Unbiased |G|^2 and tr(Sigma) from two batch gradients (eqs. A.1, A.2).

    Args:
        sq_norm_small: |G_small|^2, squared norm of the mean-loss gradient over
            ``b_small`` examples; any shape (e.g. ``[P]`` groups), broadcast with the rest.
        b_small: examples in the small batch (> 0).
        sq_norm_big: |G_big|^2 over ``b_big`` examples, at the same parameters.
        b_big: examples in the big batch (> 0, != ``b_small``).

    Returns:
        NoiseStats with the broadcast shape of the inputs.

    Raises:
        SingleMicrobatchError: if ``b_small == b_big`` (the estimator divides by
            their difference; use k >= 2 micro-batches).

    Example:
        >>> s = two_batch_stats(torch.tensor(5.0), 4.0, torch.tensor(3.0), 8.0)
        >>> round(s.grad_norm_sq.item(), 6), round(s.trace_sigma.item(), 6)
        (1.0, 16.0)
    """
    b_small_t = torch.as_tensor(b_small, dtype=sq_norm_small.dtype, device=sq_norm_small.device)
    b_big_t = torch.as_tensor(b_big, dtype=sq_norm_small.dtype, device=sq_norm_small.device)
    if b_small_t.numel() == 1 and b_big_t.numel() == 1 and float(b_small_t) == float(b_big_t):
        raise SingleMicrobatchError(
            f"the small and big batches both have {float(b_small_t):g} examples: the noise scale "
            "needs two batch sizes. Accumulate k >= 2 micro-batches per step (or use "
            "method='per_example')."
        )
    grad_norm_sq = (b_big_t * sq_norm_big - b_small_t * sq_norm_small) / (b_big_t - b_small_t)
    trace_sigma = (sq_norm_small - sq_norm_big) / (1.0 / b_small_t - 1.0 / b_big_t)
    return NoiseStats(grad_norm_sq, trace_sigma)


def effective_batch_size(weights: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Examples an average of small-batch gradients is worth: ``1 / sum_i w_i^2 / b_i``.

    The big gradient ``sum_i w_i g_i`` (weights summing to one, ``g_i`` the mean-loss
    gradient over ``b_i`` examples) has ``E|.|^2 = |G|^2 + tr(Sigma) * sum_i w_i^2/b_i``,
    so it behaves as one batch of this many examples. With ``w_i = b_i / sum(b)`` it
    is ``sum(b)``; with equal weights over equal micro-batches it is ``k b``.

    Args:
        weights: ``[K]`` non-negative weights of the small-batch gradients in the big one.
        sizes: ``[K]`` examples in each small batch.

    Returns:
        0-d tensor, examples.
    """
    w = weights / weights.sum()
    return 1.0 / (w.square() / sizes).sum()


def microbatch_stats(
    sq_norms: torch.Tensor,
    sizes: torch.Tensor,
    sq_norm_big: torch.Tensor,
    b_big: torch.Tensor,
) -> NoiseStats:
    """k-way estimator: k micro-batch (or replica) gradients and their combination.

    Averages one two-batch estimate (A.1, A.2) per micro-batch against the big
    batch. With equal sizes ``b`` and ``b_big = k b`` this is exactly
    ``|G|^2 = (k|g|^2 - m)/(k-1)``, ``tr(Sigma) = b k (m - |g|^2)/(k-1)``
    (SCIENCE.md, k-way form); with unequal sizes it stays unbiased.

    Args:
        sq_norms: ``[K, P]`` squared norms of each micro-batch's mean-loss gradient,
            per parameter group (``[K]`` also accepted).
        sizes: ``[K]`` examples in each micro-batch.
        sq_norm_big: ``[P]`` squared norm of the big gradient (the weighted mean of
            the micro-batch gradients), per group.
        b_big: examples the big gradient is worth (see :func:`effective_batch_size`).

    Returns:
        NoiseStats of shape ``[P]``.

    Raises:
        SingleMicrobatchError: if ``K < 2``.
    """
    k = sq_norms.shape[0]
    if k < 2:
        raise SingleMicrobatchError(
            f"got {k} micro-batch in this step: the microbatch method needs k >= 2 micro-batches "
            "(accumulate gradients over 2 or more backward passes per step), or use "
            "method='per_example', which works with one backward pass."
        )
    sizes = sizes.to(sq_norms.dtype).reshape((k,) + (1,) * (sq_norms.dim() - 1))
    b_big = b_big.to(sq_norms.dtype)
    grad_norm_sq = ((b_big * sq_norm_big - sizes * sq_norms) / (b_big - sizes)).mean(0)
    trace_sigma = ((sq_norms - sq_norm_big) / (1.0 / sizes - 1.0 / b_big)).mean(0)
    return NoiseStats(grad_norm_sq, trace_sigma)


def per_example_stats(
    mean_sq_norm: torch.Tensor, sq_norm_big: torch.Tensor, b_big: torch.Tensor | float
) -> NoiseStats:
    """Per-example form: every example is a small batch of one.

    .. math::

        |G|^2 = \\frac{B|\\bar g|^2 - \\overline{|g_i|^2}}{B - 1},\\qquad
        tr\\Sigma = \\frac{B}{B-1}(\\overline{|g_i|^2} - |\\bar g|^2)
        = \\frac{1}{B-1}\\sum_i |g_i - \\bar g|^2

    Args:
        mean_sq_norm: ``[P]`` mean over the B examples of their squared per-example
            gradient norms.
        sq_norm_big: ``[P]`` squared norm of the mean gradient over the B examples.
        b_big: B, examples (>= 2).

    Returns:
        NoiseStats of shape ``[P]``.

    Raises:
        SingleMicrobatchError: if ``B < 2`` (a batch of one has no spread).
    """
    if float(b_big) < 2:
        raise SingleMicrobatchError(
            f"a batch of {float(b_big):g} example cannot estimate the gradient noise: "
            "use batches of at least 2 examples."
        )
    return two_batch_stats(mean_sq_norm, 1.0, sq_norm_big, b_big)
