r"""Unbiased estimators of |G|^2 and tr(Sigma) from squared gradient norms.

Pure tensor functions, no training-loop state. All of them are forms of the
two-batch estimator of McCandlish et al. (2018), appendix A.1:

.. math::

    |\mathcal{G}|^2 = \frac{B_{big}|G_{big}|^2 - B_{small}|G_{small}|^2}{B_{big} - B_{small}}
    \qquad (A.1)

    \mathcal{S} = \frac{|G_{small}|^2 - |G_{big}|^2}{1/B_{small} - 1/B_{big}}
    \qquad (A.2)

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

Finite datasets: every estimator takes ``dataset_size=N``. Drawing B of N examples
WITHOUT replacement (shuffled epochs, full-batch steps) gives

.. math::

    E|G_B|^2 = |G|^2 + \frac{tr\Sigma_N}{B}\frac{N - B}{N - 1},

with ``Sigma_N`` the population covariance of the N per-example gradients (divided by
N), so every ``1/B`` in (A.1, A.2) becomes :func:`sampling_variance` of it; at B = N the
per-example form returns the exact full-dataset |G|^2 and tr(Sigma_N). Without
``dataset_size`` (sampling with replacement assumed), draws without replacement give in
expectation ``N/(N-1) tr(Sigma_N)`` and ``|G|^2 - tr(Sigma_N)/(N-1)`` whatever B, so B_simple
comes out about ``N/(N - 1 - B_simple)`` times too large: negligible while B_simple << N.

Loss conventions (:func:`loss_factors`) and the estimators as matrices
(:func:`microbatch_coefficients`, :func:`per_example_coefficients`) turn what a
training loop's backward passes actually produce into these forms.

Per-step values can be negative: that is noise, never clamp them before
averaging (SCIENCE.md; fairscale's AdaScale clamps and is biased).

References:
    McCandlish, Kaplan, Amodei (2018), An Empirical Model of Large-Batch
    Training, arXiv:1812.06162, appendix A.1, eqs. (A.1), (A.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch

from noisescale.errors import SingleMicrobatchError

__all__ = [
    "COEFFICIENT_ROWS",
    "Accumulation",
    "NoiseStats",
    "Reduction",
    "check_dataset_size",
    "contradiction_rtol",
    "effective_batch_size",
    "loss_factors",
    "microbatch_coefficients",
    "microbatch_stats",
    "per_example_coefficients",
    "per_example_stats",
    "sampling_variance",
    "two_batch_stats",
]

Reduction = Literal["mean", "sum"]
"""How ONE micro-batch's loss is reduced over its examples."""
Accumulation = Literal["mean", "sum", "example_mean"]
"""How the micro-batch losses of one step combine (see :func:`loss_factors`)."""
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)
ACCUMULATIONS: tuple[Accumulation, ...] = get_args(Accumulation)


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


def check_dataset_size(dataset_size: int | None) -> int | None:
    """Validate ``dataset_size``: None (sampling with replacement) or an integer N >= 2, examples.

    Raises:
        ValueError: if it is not an integer of at least 2 (a dataset of one example has no noise).
    """
    if dataset_size is None:
        return None
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 2:
        raise ValueError(
            f"Expected `dataset_size` to be an integer >= 2 (examples in the dataset the batches are "
            f"drawn from without replacement) or None (with replacement) but got {dataset_size!r}"
        )
    return int(dataset_size)


def sampling_variance(inv_size: torch.Tensor, dataset_size: int | None = None) -> torch.Tensor:
    r"""The coefficient ``v`` of tr(Sigma) in ``E|G_B|^2 = |G|^2 + v tr(Sigma)``.

    For a weighted mean ``sum_n u_n g_n`` of distinct examples (``sum u = 1``) with
    ``inv_size = sum_n u_n^2`` (``1/B`` for a plain mean of B examples, ``1/b_big`` from
    :func:`effective_batch_size`):

    .. math::

        v = \sum u_n^2 \ \text{(with replacement)},\qquad
        v = \frac{N \sum u_n^2 - 1}{N - 1} \ \text{(without, from N examples)},

    the second because two distinct examples drawn without replacement have
    ``E[g_i . g_j] = |G|^2 - tr(Sigma_N)/(N - 1)``; for a plain mean it is
    ``(1/B)(N - B)/(N - 1)`` (SCIENCE.md), 0 at B = N.

    Args:
        inv_size: ``sum_n u_n^2``, any shape, 1/examples.
        dataset_size: N, or None for sampling with replacement.

    Returns:
        ``v``, same shape.

    Example:
        >>> [round(v, 6) for v in sampling_variance(torch.tensor([1 / 4, 1 / 10]), dataset_size=10).tolist()]
        [0.166667, 0.0]
    """
    if dataset_size is None:
        return inv_size
    return (dataset_size * inv_size - 1.0) / (dataset_size - 1.0)


def two_batch_stats(
    sq_norm_small: torch.Tensor,
    b_small: torch.Tensor | float,
    sq_norm_big: torch.Tensor,
    b_big: torch.Tensor | float,
    *,
    dataset_size: int | None = None,
) -> NoiseStats:
    r"""Unbiased |G|^2 and tr(Sigma) from two batch gradients (eqs. A.1, A.2).

    .. math::

        |G|^2 = \frac{v_s |G_{big}|^2 - v_b |G_{small}|^2}{v_s - v_b},\qquad
        tr\Sigma = \frac{|G_{small}|^2 - |G_{big}|^2}{v_s - v_b}

    with ``v = 1/B`` (this is exactly A.1, A.2), or without replacement from N
    examples ``v = (N/B - 1)/(N - 1)`` (:func:`sampling_variance`; tr(Sigma) is then
    that of the N examples' population covariance).

    Args:
        sq_norm_small: |G_small|^2, squared norm of the mean-loss gradient over
            ``b_small`` examples; any shape (e.g. ``[P]`` groups), broadcast with the rest.
        b_small: examples in the small batch (> 0).
        sq_norm_big: |G_big|^2 over ``b_big`` examples, at the same parameters.
        b_big: examples in the big batch (> 0, != ``b_small``; <= N).
        dataset_size: N when the batches are drawn without replacement from N examples.

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
    v_small = sampling_variance(1.0 / b_small_t, dataset_size)
    v_big = sampling_variance(1.0 / b_big_t, dataset_size)
    grad_norm_sq = (v_small * sq_norm_big - v_big * sq_norm_small) / (v_small - v_big)
    trace_sigma = (sq_norm_small - sq_norm_big) / (v_small - v_big)
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
    *,
    dataset_size: int | None = None,
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
        dataset_size: N when the step's examples are drawn without replacement from N
            (:func:`two_batch_stats`); the micro-batches are then disjoint parts of it.

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
    v_small = sampling_variance(1.0 / sizes, dataset_size)
    v_big = sampling_variance(1.0 / b_big.to(sq_norms.dtype), dataset_size)
    grad_norm_sq = ((v_small * sq_norm_big - v_big * sq_norms) / (v_small - v_big)).mean(0)
    trace_sigma = ((sq_norms - sq_norm_big) / (v_small - v_big)).mean(0)
    return NoiseStats(grad_norm_sq, trace_sigma)


def per_example_stats(
    mean_sq_norm: torch.Tensor,
    sq_norm_big: torch.Tensor,
    b_big: torch.Tensor | float,
    *,
    dataset_size: int | None = None,
) -> NoiseStats:
    r"""Per-example form: every example is a small batch of one.

    .. math::

        |G|^2 = \frac{B|\bar g|^2 - \overline{|g_i|^2}}{B - 1},\qquad
        tr\Sigma = \frac{B}{B-1}(\overline{|g_i|^2} - |\bar g|^2)
        = \frac{1}{B-1}\sum_i |g_i - \bar g|^2

    Without replacement from N examples (``dataset_size``):

    .. math::

        tr\Sigma_N = \frac{B (N - 1)}{N (B - 1)}(\overline{|g_i|^2} - |\bar g|^2),\qquad
        |G|^2 = \overline{|g_i|^2} - tr\Sigma_N,

    which at B = N is exactly the full dataset's ``|\bar g|^2`` and
    ``(1/N) sum_i |g_i - \bar g|^2``.

    Args:
        mean_sq_norm: ``[P]`` mean over the B examples of their squared per-example
            gradient norms.
        sq_norm_big: ``[P]`` squared norm of the mean gradient over the B examples.
        b_big: B, examples (>= 2; <= N).
        dataset_size: N, or None for sampling with replacement.

    Returns:
        NoiseStats of shape ``[P]``.

    Raises:
        SingleMicrobatchError: if ``B < 2`` (a batch of one has no spread).

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 3.0]])  # the whole dataset, N = B = 3
        >>> s = per_example_stats(g.square().sum(1).mean(), g.mean(0).square().sum(), 3, dataset_size=3)
        >>> round(s.grad_norm_sq.item(), 6), round(s.trace_sigma.item(), 6)  # |mean|^2, mean |g - mean|^2
        (5.0, 2.666667)
    """
    if float(b_big) < 2:
        raise SingleMicrobatchError(
            f"a batch of {float(b_big):g} example cannot estimate the gradient noise: "
            "use batches of at least 2 examples."
        )
    return two_batch_stats(mean_sq_norm, 1.0, sq_norm_big, b_big, dataset_size=dataset_size)


# -- from what a training loop records to the forms above --------------------------------------
def loss_factors(
    sizes: Sequence[int],
    *,
    reduction: Reduction = "mean",
    accumulation: Accumulation = "mean",
    step_examples: int | None = None,
    world_size: int = 1,
) -> tuple[float, ...]:
    """The factor ``c_i`` of each backward pass: it produced ``c_i g_i``, ``g_i`` the MEAN-loss gradient.

    One process (or one DDP rank) runs ``k = len(sizes)`` backward passes, the i-th over
    ``n_i`` examples. Its loss is

    - ``reduction="mean"``: the mean over the ``n_i`` examples (``c_i = 1``), or ``"sum"``:
      their sum (``c_i = n_i``);
    - then ``accumulation="mean"``: divided by k (``c_i /= k``), or ``"sum"``: not;
    - or ``accumulation="example_mean"``: the SUM over its examples divided by the
      ``step_examples`` of the whole step (every rank's), times ``world_size`` to undo
      DDP's averaging, so ``c_i = n_i W / step_examples`` whatever the sizes (HF Trainer's
      ``num_items_in_batch``, token-weighted language-model losses); ``reduction`` unused.

    Each example's own gradient enters with ``a_i = c_i / n_i``. The accumulated ``.grad``
    is ``sum_i c_i g_i`` (under DDP: over every rank's backward passes, divided by W).

    Args:
        sizes: ``[k]`` examples in each backward pass, in order (this rank's).
        reduction: see above.
        accumulation: see above.
        step_examples: examples in the whole step, every rank's (default: ``sum(sizes)``).
        world_size: W, DDP replicas (1 in one process).

    Returns:
        ``k`` factors.

    Raises:
        ValueError: on an unknown ``reduction`` or ``accumulation``.

    Example:
        >>> loss_factors([4, 12], reduction="sum", accumulation="mean")
        (2.0, 6.0)
        >>> loss_factors([4, 12], accumulation="example_mean", step_examples=32, world_size=2)
        (0.25, 0.75)
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"Expected `reduction` to be one of {REDUCTIONS} but got {reduction!r}")
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"Expected `accumulation` to be one of {ACCUMULATIONS} but got {accumulation!r}")
    if accumulation == "example_mean":
        total = sum(sizes) if step_examples is None else step_examples
        return tuple(n * world_size / total for n in sizes)
    per_pass = 1.0 / len(sizes) if accumulation == "mean" else 1.0
    return tuple((float(n) if reduction == "sum" else 1.0) * per_pass for n in sizes)


COEFFICIENT_ROWS = ("grad_norm_sq", "trace_sigma", "mean_small_sq", "big_sq")
"""Rows of the coefficient matrices: the step's |G|^2 and tr(Sigma) estimates, then the
convex-combination bound ``sum_i w_i |g_i|^2`` and ``|sum_i w_i g_i|^2`` itself (the big
batch's squared norm, normalised). A mean can never exceed the bound (Jensen):
``big_sq > mean_small_sq`` means the records contradict "the big batch is the mean of the
small ones"."""


def microbatch_coefficients(
    sizes: Sequence[int],
    factors: Sequence[float],
    *,
    world_size: int = 1,
    dataset_size: int | None = None,
) -> torch.Tensor:
    """The k-way estimator as a ``[4, k + 1]`` float64 matrix (rows: :data:`COEFFICIENT_ROWS`).

    Backward pass i recorded ``|c_i g_i|^2`` and the big gradient in ``.grad`` is
    ``sum_i c_i g_i / W`` (``c_i`` from :func:`loss_factors`; under DDP the ``k = W m``
    backward passes of every rank, rank-major, and DDP's all-reduce divides by W). The
    mean-loss gradients enter the big one with convex weights ``w_i = c_i / sum c``, as
    one batch of :func:`effective_batch_size` examples. Every row is linear in the
    ``k + 1`` recorded squared norms, so its values on the unit vectors are its matrix:
    a step's rows are ``this @ [|c_1 g_1|^2, ..., |c_k g_k|^2, |.grad|^2]``.

    Args:
        sizes: ``[k]`` examples per backward pass.
        factors: ``[k]`` their loss factors ``c_i``.
        world_size: W (1 in one process).
        dataset_size: N for sampling without replacement (:func:`microbatch_stats`).

    Returns:
        ``[4, k + 1]`` float64 on the CPU.

    Example:
        >>> factors = loss_factors([4, 4])  # mean losses divided by k = 2: (0.5, 0.5)
        >>> recorded = torch.tensor([5.0 / 4, 3.0 / 4, 2.5], dtype=torch.float64)  # |g_i / 2|^2, |.grad|^2
        >>> rows = microbatch_coefficients([4, 4], factors) @ recorded
        >>> small, sizes = torch.tensor([5.0, 3.0], dtype=torch.float64), torch.tensor([4, 4])
        >>> ref = microbatch_stats(small, sizes, torch.tensor(2.5, dtype=torch.float64), torch.tensor(8.0))
        >>> torch.allclose(rows[:2], torch.stack(ref)), rows[2:].tolist()
        (True, [4.0, 2.5])
    """
    k = len(sizes)
    unit = torch.eye(k + 1, dtype=torch.float64)
    c = torch.tensor(factors, dtype=torch.float64)
    b = torch.tensor(sizes, dtype=torch.float64)
    small = unit[:k] / c.square()[:, None]  # [k, k + 1]: |g_i|^2
    big = unit[k] * (world_size / c.sum()) ** 2  # [k + 1]: |sum_i w_i g_i|^2
    weight = c / c.sum()
    stats = microbatch_stats(small, b, big, effective_batch_size(weight, b), dataset_size=dataset_size)
    return torch.stack([*stats, weight @ small, big])


def per_example_coefficients(
    examples: int,
    weight: float,
    weight2: float,
    *,
    world_size: int = 1,
    dataset_size: int | None = None,
) -> torch.Tensor:
    """The per-example estimator as a ``[4, 3]`` float64 matrix (rows: :data:`COEFFICIENT_ROWS`).

    Its columns take a step's ``sum_n |g_n|^2`` and ``sum_n a_n |g_n|^2`` (``g_n`` the
    gradient of example n's own loss, ``a_n`` its factor: :func:`loss_factors` over its
    micro-batch's size) and ``|.grad|^2``, with ``.grad = sum_n a_n g_n / W``: the
    mean of ``B = examples`` squared norms against the big batch, a weighted mean
    worth ``(sum a)^2 / sum a^2`` examples (:func:`per_example_stats`).

    Args:
        examples: B, examples in the step (every rank's).
        weight: ``sum_n a_n``.
        weight2: ``sum_n a_n^2``.
        world_size: W (1 in one process).
        dataset_size: N for sampling without replacement.

    Returns:
        ``[4, 3]`` float64 on the CPU.

    Raises:
        noisescale.errors.SingleMicrobatchError: if the step has fewer than 2 examples.

    Example:
        >>> x = torch.tensor([10.0, 2.5, 4.0], dtype=torch.float64)  # 4 examples, a_n = 1/4
        >>> rows = per_example_coefficients(4, 1.0, 0.25) @ x
        >>> ref = per_example_stats(x[0] / 4, x[2], 4)
        >>> torch.allclose(rows[:2], torch.stack(ref)), rows[2:].tolist()
        (True, [2.5, 4.0])
    """
    unit = torch.eye(3, dtype=torch.float64)
    big = unit[2] * (world_size / weight) ** 2
    stats = per_example_stats(unit[0] / examples, big, weight**2 / weight2, dataset_size=dataset_size)
    return torch.stack([*stats, unit[1] / weight, big])


def contradiction_rtol(dtype: torch.dtype) -> float:
    """Relative float tolerance of the Jensen check ``big_sq <= mean_small_sq`` for gradients of ``dtype``.

    ``2^13`` machine epsilons (about 1e-3 in float32, 2e-12 in float64), at most 1: the
    squared norms and the accumulated ``.grad`` are rounded in the gradients' own dtype,
    and a false alarm costs more than a missed mild contradiction (a DDP hook that sums
    over 2 replicas multiplies ``big_sq`` by 4).
    """
    return min(2.0**13 * torch.finfo(dtype).eps, 1.0)
