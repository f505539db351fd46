"""One optimizer step's records, typed, and the statistics the estimators make of them.

A step's records are what the hooks saw (:mod:`noisescale.collect`), per cell: the
squared norm of each backward pass's gradient (``microbatch``/``ddp``) or sums of
per-example squared norms (``per_example``), and the squared norm of the accumulated
``.grad``. The loss conventions (:func:`noisescale.estimators.loss_factors`) and the
estimators as matrices (:func:`noisescale.estimators.microbatch_coefficients`,
:func:`~noisescale.estimators.per_example_coefficients`) turn them into the step's
``[4, C]`` rows (:data:`noisescale.estimators.COEFFICIENT_ROWS`): |G|^2, tr(Sigma), and the
two sides of the consistency check.

Shape letters: ``C`` cells (:mod:`noisescale.meter.partition`), ``k`` backward passes.
"""

from __future__ import annotations

import functools
import itertools
import numbers
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from noisescale.errors import SingleMicrobatchError
from noisescale.estimators import (
    Accumulation,
    Reduction,
    loss_factors,
    microbatch_coefficients,
    per_example_coefficients,
)

__all__ = [
    "MicrobatchStep",
    "PerExampleStep",
    "check_count",
    "check_within_dataset",
    "contradicted",
    "microbatch_matrix",
    "per_example_matrix",
    "per_example_step",
    "split_sizes",
    "unit_rows",
]


def check_count(name: str, value: object, unit: str = "examples") -> None:
    """Raise unless ``value`` is a positive integer (a number of ``unit``).

    Raises:
        ValueError: naming the argument and the unit.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer ({unit}) but got {value!r}")


def _is_count(value: object) -> bool:
    """Whether ``value`` is an integer >= 0 (a Python or numpy integer, or a 0-d integer tensor)."""
    if isinstance(value, torch.Tensor):
        real_int = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        return value.numel() == 1 and real_int and int(value) >= 0
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 0


def check_within_dataset(examples: int, dataset_size: int | None) -> None:
    """Raise if a step drew more examples than the dataset holds.

    Raises:
        ValueError: if ``examples > dataset_size``.
    """
    if dataset_size is not None and examples > dataset_size:
        raise ValueError(
            f"a step of {examples} examples cannot be drawn without replacement from dataset_size="
            f"{dataset_size} examples: give the number of examples the batches are drawn from"
        )


class MicrobatchStep(NamedTuple):
    """One step of ``microbatch``/``ddp``, this process's records."""

    small: torch.Tensor  # [k, C] float64: |c_i g_i|^2 of each backward pass (loss factors not undone)
    big: torch.Tensor  # [C] float64: |.grad|^2
    sizes: tuple[int, ...]  # examples in each backward pass


class PerExampleStep(NamedTuple):
    """One step of ``per_example``, this process's records (additive over DDP ranks).

    Under DDP with ``accumulation="example_mean"`` each example's factor ``a_n = W / N_all``
    is known only once every rank's count is in: the sums are then taken with ``a_n = 1``
    and rescaled after the exchange (:mod:`noisescale.meter.exchange`).
    """

    sums: torch.Tensor  # [2, C] float64: sum_n |g_n|^2, sum_n a_n |g_n|^2
    big: torch.Tensor  # [C] float64: |.grad|^2
    examples: int  # B, examples in the step
    weight: float  # sum_n a_n
    weight2: float  # sum_n a_n^2
    local: torch.Tensor | None = None  # [C] float64 under DDP: sum_i c_i |g_i|^2 over the backward passes


def split_sizes(k: int, batch_size: int | None, given: Iterable[int] | None) -> tuple[int, ...]:
    """The examples of each of ``k`` backward passes, from what ``update`` was told.

    Raises:
        ValueError: if the sizes are not positive integers, do not match ``k`` or
            ``batch_size``, or neither is given, or ``batch_size`` is not divisible by ``k``.
    """
    if batch_size is not None:
        check_count("batch_size", batch_size)
    if given is not None:
        sizes = list(given)
        for b in sizes:
            check_count("microbatch_sizes", b)
        if len(sizes) != k:
            raise ValueError(f"got {len(sizes)} microbatch_sizes for {k} backward passes")
        if batch_size is not None and batch_size != sum(sizes):
            raise ValueError(f"batch_size={batch_size} but microbatch_sizes sum to {sum(sizes)}")
        return tuple(int(b) for b in sizes)
    if batch_size is None:
        raise ValueError("the microbatch method needs update(batch_size=...) or microbatch_sizes=...")
    if batch_size % k:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {k} backward passes seen: pass "
            "microbatch_sizes=[...] for unequal micro-batches"
        )
    return (batch_size // k,) * k


def _checked(per_example: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Each backward pass's ``[n_i, C]`` per-example squared norms.

    Raises:
        RuntimeError: if a backward pass produced gradients but no per-example norms.
    """
    if any(x is None for x in per_example):
        raise RuntimeError(
            "a backward pass produced parameter gradients but no per-example norms: a parameter "
            "was used outside the layer that owns it (e.g. `h @ emb.weight.T`). Tie weights through "
            "a module (`head.weight = emb.weight`) or use method='microbatch'."
        )
    return [x for x in per_example if x is not None]


def unit_rows(
    per_example: Sequence[torch.Tensor | None],
    big: torch.Tensor,
    example_sizes: int | Iterable[int],
    batch_size: int | None,
    reduction: Reduction,
    accumulation: Accumulation,
) -> tuple[torch.Tensor, int]:
    r"""A ``per_example`` step in loss units (tokens): each example is a small batch of its units.

    Example ``s`` (a sequence: a row of dim 0) carries ``w_s`` loss units (its predicted,
    unmasked tokens). Backward pass ``i`` reduced its loss over its ``N_i = sum_s w_s`` units
    (``reduction``, ``accumulation`` of :func:`~noisescale.estimators.loss_factors` over the
    ``N_i``), so every unit entered with ``c_i / N_i`` and sequence ``s`` with
    ``c_s = w_s c_i / N_i`` times the mean-loss gradient ``g_s`` over its own units: the hooks
    recorded ``|c_s g_s|^2``, exactly what a micro-batch of ``w_s`` units records. The k-way
    estimator over the sequences (:func:`~noisescale.estimators.microbatch_coefficients`) then
    gives |G|^2 and tr(Sigma) per unit, unbiased when ``E|g_s|^2 = |G|^2 + tr(Sigma)/w_s``.
    With ``T`` units in every sequence it is exactly ``T`` times the per-sequence estimate
    (``B_tokens = T B_sequences``); sequences without units (fully masked) are left out.

    Args:
        per_example: per backward pass, ``[n_i, C]`` squared norms of each example's gradient.
        big: ``[C]`` squared norms of ``.grad``.
        example_sizes: units of every example (an int), or of each, in backward order.
        batch_size: units the caller says the step had, or None.
        reduction: the loss's reduction over a backward pass's units.
        accumulation: how the backward passes' losses combine.

    Returns:
        The step's ``[4, C]`` rows (:data:`~noisescale.estimators.COEFFICIENT_ROWS`) and its units.

    Raises:
        ValueError: if the sizes do not match the examples the hooks saw or ``batch_size``, or
            a backward pass has no unit.
        noisescale.errors.SingleMicrobatchError: if fewer than 2 examples carry units.
    """
    norms = _checked(per_example)
    counts = [int(x.shape[0]) for x in norms]
    given = list(example_sizes) if isinstance(example_sizes, Iterable) else [example_sizes] * sum(counts)
    bad = (
        example_sizes
        if isinstance(example_sizes, str | bytes)
        else next((w for w in given if not _is_count(w)), None)
    )
    if bad is not None:
        raise ValueError(
            f"example_sizes must be integers >= 0 (loss units, e.g. tokens, of each example) but got {bad!r}"
        )
    sizes = [int(w) for w in given]
    if len(sizes) != sum(counts):
        raise ValueError(
            f"got {len(sizes)} example_sizes for the {sum(counts)} examples the per-example hooks saw "
            f"(dim 0 of the layer inputs): give one count >= 0 of loss units (tokens) per example"
        )
    matrix, keep, units = _unit_plan(
        tuple(sizes), tuple(counts), batch_size, reduction, accumulation, big.device
    )
    small = torch.cat(norms).to(torch.float64)  # [n, C]
    if keep is not None:
        small = small[keep]
    return matrix @ torch.cat([small, big[None].to(torch.float64)]), units


@functools.lru_cache(maxsize=64)
def _unit_plan(
    sizes: tuple[int, ...],
    counts: tuple[int, ...],
    batch_size: int | None,
    reduction: Reduction,
    accumulation: Accumulation,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Cached host work of :func:`unit_rows`: its ``[4, k + 1]`` matrix, the examples kept, the units.

    The same sizes recur step after step; a failed check raises (and is not cached) every time.
    """
    ends = list(itertools.accumulate(counts))
    units = [sum(sizes[e - n : e]) for e, n in zip(ends, counts, strict=True)]
    if batch_size is not None and batch_size != sum(units):
        raise ValueError(f"batch_size={batch_size} but example_sizes sum to {sum(units)}")
    for n in units:
        check_count("units of a backward pass (sum of its example_sizes)", n, "tokens")
    factors = loss_factors(units, reduction=reduction, accumulation=accumulation)
    per_unit = [c / n for c, n, m in zip(factors, units, counts, strict=True) for _ in range(m)]
    keep = [s for s, w in enumerate(sizes) if w > 0]
    if len(keep) < 2:
        raise SingleMicrobatchError(
            f"{len(keep)} example(s) of this step carry loss units (example_sizes > 0): the per-example "
            "estimate in units needs 2 or more"
        )
    matrix = microbatch_matrix(
        tuple(sizes[s] for s in keep), tuple(sizes[s] * per_unit[s] for s in keep), 1, None, device
    )
    kept = torch.tensor(keep, device=device) if len(keep) < len(sizes) else None
    return matrix, kept, sum(units)


def per_example_step(
    per_example: Sequence[torch.Tensor | None],
    grad_norms: torch.Tensor,
    *,
    batch_size: int | None,
    reduction: Reduction,
    accumulation: Accumulation,
    placeholder_factors: bool = False,
) -> PerExampleStep:
    """Undo the loss factors of each backward pass's per-example squared norms.

    Args:
        per_example: per backward pass i, ``[n_i, C]`` squared norms of ``a_i g_n`` (None:
            the pass had gradients but no per-example norms).
        grad_norms: ``[1, C]`` squared norms of ``.grad``; under DDP ``[k + 1, C]``, first those
            of each backward pass's whole (local) gradient ``c_i g_i = sum_n a_i g_n``
            (:meth:`noisescale.collect.GradientRecorder.sq_norms` with ``big``). They
            become ``local``, ``sum_i |c_i g_i|^2 / c_i``: additive over the ranks, and
            divided by every rank's ``sum c = sum_n a_n`` the convex bound on the
            all-reduced ``.grad`` (:mod:`noisescale.meter.exchange`).
        batch_size: examples the caller says the step had, or None (counted).
        reduction: the loss's reduction over a micro-batch.
        accumulation: how micro-batch losses combine.
        placeholder_factors: take ``a_n = 1`` (DDP ``example_mean``: rescaled after the exchange).

    Raises:
        RuntimeError: if a backward pass produced gradients but no per-example norms.
        ValueError: if ``batch_size`` is not the examples the hooks saw.
    """
    norms = _checked(per_example)
    sizes = [int(x.shape[0]) for x in norms]
    if batch_size is not None:
        check_count("batch_size", batch_size)
        if batch_size != sum(sizes):
            raise ValueError(
                f"batch_size={batch_size} but the per-example hooks saw {sum(sizes)} examples "
                f"(dim 0 of the layer inputs) in {len(sizes)} backward pass(es)"
            )
    factors = loss_factors(sizes, reduction=reduction, accumulation=accumulation)
    a = [1.0] * len(sizes) if placeholder_factors else [c / n for c, n in zip(factors, sizes, strict=True)]
    raw = [x.sum(0).to(torch.float64) for x in norms]  # [C] each: sum_n |a_i g_n|^2
    sums = torch.stack(
        [
            torch.stack([r / ai**2 for r, ai in zip(raw, a, strict=True)]).sum(0),  # sum_n |g_n|^2
            torch.stack([r / ai for r, ai in zip(raw, a, strict=True)]).sum(0),  # sum_n a_n |g_n|^2
        ]
    )
    weight = sum(n * ai for n, ai in zip(sizes, a, strict=True))
    weight2 = sum(n * ai**2 for n, ai in zip(sizes, a, strict=True))
    local = None
    if len(grad_norms) > 1:  # c_i = a_i n_i (placeholder factors: n_i, rescaled like sums[1])
        c = [n * ai for n, ai in zip(sizes, a, strict=True)]  # Python floats: no tensor from the host
        local = torch.stack([row / ci for row, ci in zip(grad_norms[:-1], c, strict=True)]).sum(0)
    return PerExampleStep(sums, grad_norms[-1], sum(sizes), weight, weight2, local)


@functools.lru_cache(maxsize=64)
def microbatch_matrix(
    sizes: tuple[int, ...],
    factors: tuple[float, ...],
    world_size: int,
    dataset_size: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Cached :func:`~noisescale.estimators.microbatch_coefficients` on ``device``: ``[4, k + 1]``.

    The same sizes recur step after step; on an accelerator a fresh tensor from the host
    would wait for the device.
    """
    return microbatch_coefficients(sizes, factors, world_size=world_size, dataset_size=dataset_size).to(
        device
    )


@functools.lru_cache(maxsize=64)
def per_example_matrix(
    examples: int,
    weight: float,
    weight2: float,
    world_size: int,
    dataset_size: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Cached :func:`~noisescale.estimators.per_example_coefficients` on ``device``: ``[4, 3]``."""
    return per_example_coefficients(
        examples, weight, weight2, world_size=world_size, dataset_size=dataset_size
    ).to(device)


def contradicted(rows: torch.Tensor, rtol: float) -> torch.Tensor:
    """Where a step's big batch is impossible for a (weighted) mean of its small ones.

    ``|sum_i w_i g_i|^2 <= sum_i w_i |g_i|^2`` for convex weights (Jensen), per cell; a
    step above it by more than ``rtol`` of the bound contradicts the loss conventions.
    NaN rows (skipped steps) are never flagged.

    Args:
        rows: ``[N, 4, C]`` steps' rows (:data:`noisescale.estimators.COEFFICIENT_ROWS`).
        rtol: relative float tolerance (:func:`noisescale.estimators.contradiction_rtol`).

    Returns:
        ``[N, C]`` bool, on the device of ``rows`` (no host synchronisation).
    """
    bound, big = rows[:, 2], rows[:, 3]
    return big - bound > rtol * bound.abs()
