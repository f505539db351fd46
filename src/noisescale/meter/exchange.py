"""The meter's DDP protocol: one small asynchronous collective every few steps.

Every rank records its own steps (:mod:`noisescale.meter.steps`). Every ``sync_every``
steps (and at ``meter.sync()``) the unsent steps travel in ONE collective: under
``microbatch``/``ddp`` an all-gather of every rank's ``[M, C + 2]`` rows (one per
backward pass: its squared norms per cell, then :class:`MicrobatchRow`); under
``per_example`` an all-reduce (sum) of ``[N, 3 C + 3]`` rows (one per step: its per-example
sums, its backward passes' ``local`` sum, then :class:`PerExampleRow`). The big batch needs
no exchange under DDP, whose all-reduce left the same ``.grad`` on every rank; under FSDP2
each rank's ``.grad`` is a shard (:mod:`noisescale.fsdp`), so each row also carries the
squared norms of this rank's shard (``C`` more columns, on a step's first row under
``microbatch``/``fsdp``), summed over the ranks in the same collective. The collective
started at one exchange is waited for at the next (it has had ``sync_every`` steps to
finish) or at ``compute()``; then every rank turns the same numbers into the same
``[N, 4, C]`` rows, so rank 0's estimate is every rank's.

The consistency check under ``per_example`` is rank-level as well as per-example: ``.grad``
is the mean of every rank's backward passes with convex weights ``c_i / sum c``, so its
normalised squared norm cannot exceed ``sum_i c_i |g_i|^2 / sum c`` over every rank's passes
(Jensen; the ``local`` column, a bound tighter than the per-example one, which a
communication hook that sums without dividing by W rarely exceeds). With such a hook, W
ranks of m equal passes of b examples (``c_i = 1/m``) give
``E|.grad|^2 = W^2 (|G|^2 + tr Sigma / (W m b))`` against the bound's ``|G|^2 + tr Sigma / b``:
exceeded in expectation iff ``(W^2 - 1) |G|^2 > (1 - W/m) tr Sigma / b``, that is at every
step for ``m <= W`` (W >= 2) and, for ``m > W``, while ``B_simple < b m (W^2 - 1) / (m - W)``
(``B_simple < 4 b`` at W = 2, m = 4).

The loss factors of every backward pass are made here from every rank's sizes, with the
one rule of :func:`noisescale.estimators.loss_factors`: ``example_mean`` needs the
examples of the whole step, known only after the exchange.

Shape letters: ``W`` ranks, ``M`` backward passes of this rank over the ``N`` steps of
one exchange, ``C`` cells.

References:
    McCandlish et al. (2018), arXiv:1812.06162, appendix A.1 (k-way form over replicas).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from noisescale import distributed as nsdist
from noisescale.estimators import Accumulation, Reduction, loss_factors
from noisescale.meter.steps import (
    MicrobatchStep,
    PerExampleStep,
    check_within_dataset,
    microbatch_matrix,
    per_example_matrix,
)
from noisescale.options import Method

__all__ = ["Exchange", "MicrobatchRow", "PerExampleRow"]


class MicrobatchRow(NamedTuple):
    """The metadata of one backward pass, as it travels (after its ``C`` squared norms)."""

    examples: int  # in this backward pass
    backward_passes: int  # m, of its rank in its step

    @classmethod
    def of(cls, columns: list[float]) -> MicrobatchRow:
        """From the exchanged float64 columns."""
        examples, backward_passes = columns
        return cls(round(examples), round(backward_passes))


class PerExampleRow(NamedTuple):
    """The metadata of one step under ``per_example``, summed over the ranks (after its ``2 C`` sums)."""

    examples: int  # B, every rank's
    weight: float  # sum_n a_n
    weight2: float  # sum_n a_n^2

    @classmethod
    def of(cls, columns: list[float]) -> PerExampleRow:
        """From the exchanged float64 columns."""
        examples, weight, weight2 = columns
        return cls(round(examples), weight, weight2)


class _Collective(NamedTuple):
    """One collective over several steps' rows, started on every rank."""

    work: Any  # wait on it before reading ``outputs``
    outputs: list[torch.Tensor]  # every rank's [M, C + 2] rows, or the summed [N, 3 C + 3]
    backward_passes: list[int]  # this rank's backward passes in each of the N steps
    big: torch.Tensor  # [N, C]: each step's |.grad|^2
    skip: int  # leading steps exchanged only so that every rank's collective has the same shape


class Exchange:
    """The unsent steps of one rank and the collective in flight.

    Args:
        method: ``"ddp"``/``"fsdp"`` (k-way over every rank's backward passes) or ``"per_example"``.
        reduction: the loss convention (see :func:`noisescale.estimators.loss_factors`).
        accumulation: the loss convention.
        process_group: the DDP model's group.
        world_size: W.
        dataset_size: N for sampling without replacement, or None.
        sharded: each rank's ``.grad`` is a shard (FSDP2): the big batch's squared norms are
            summed over the ranks.
    """

    def __init__(
        self,
        method: Method,
        *,
        reduction: Reduction,
        accumulation: Accumulation,
        process_group: dist.ProcessGroup | None,
        world_size: int,
        dataset_size: int | None,
        sharded: bool = False,
    ) -> None:
        self.method = method
        self.sharded = sharded
        self.reduction: Reduction = reduction
        self.accumulation: Accumulation = accumulation
        self.process_group = process_group
        self.world_size = world_size
        self.dataset_size = dataset_size
        self.unsent: list[MicrobatchStep | PerExampleStep] = []
        self.skip = 0  # leading unsent steps dropped on this rank (reset, load, remove)
        self.collective: _Collective | None = None

    @property
    def placeholder_factors(self) -> bool:
        """Per-example factors unknown before the exchange (``example_mean``: W / every rank's examples)."""
        return self.accumulation == "example_mean"

    def add(self, step: MicrobatchStep | PerExampleStep) -> None:
        """Keep one step's records until the next exchange."""
        self.unsent.append(step)

    def start(self) -> None:
        """Start one collective over the unsent steps (every rank at the same step).

        The caller collects the previous collective first.
        """
        assert self.collective is None, "collect() the previous exchange first"
        unsent, self.unsent = self.unsent, []
        skip, self.skip = self.skip, 0
        if not unsent:
            return
        big = torch.stack([s.big for s in unsent])  # [N, C]
        if self.method == "per_example":
            rows = torch.cat([self._per_example_row(s, self.sharded) for s in unsent])  # [N, 3 C + 3 (+ C)]
            work, outputs, passes = nsdist.reduce_sums(rows, self.process_group), [rows], [1] * len(unsent)
        else:
            rows = torch.cat([self._microbatch_rows(s, self.sharded) for s in unsent])  # [M, C + 2 (+ C)]
            work, outputs = nsdist.gather_rows(rows, self.process_group)
            passes = [len(s.sizes) for s in unsent]  # type: ignore[union-attr]
        self.collective = _Collective(work, outputs, passes, big, skip)

    @staticmethod
    def _microbatch_rows(step: MicrobatchStep | PerExampleStep, sharded: bool) -> torch.Tensor:
        assert isinstance(step, MicrobatchStep)
        m = len(step.sizes)
        meta = torch.tensor([[b, m] for b in step.sizes], dtype=torch.float64)
        parts = [step.small, meta.to(step.small.device)]
        if sharded:  # this rank's part of |.grad|^2, on the step's first row
            parts.append(torch.cat([step.big[None], step.small.new_zeros(m - 1, len(step.big))]))
        return torch.cat(parts, dim=1)

    @staticmethod
    def _per_example_row(step: MicrobatchStep | PerExampleStep, sharded: bool) -> torch.Tensor:
        assert isinstance(step, PerExampleStep) and step.local is not None
        meta = torch.tensor([step.examples, step.weight, step.weight2], dtype=torch.float64)
        big = [step.big] if sharded else []  # this rank's part of |.grad|^2
        return torch.cat([step.sums.flatten(), step.local, meta.to(step.sums.device), *big])[None]

    def drop(self) -> None:
        """Forget the collective in flight; the unsent steps are still sent (every rank's shapes match)."""
        if self.collective is not None:
            self.collective.work.wait()
        self.collective = None
        self.skip = len(self.unsent)

    def drop_unsent(self) -> int:
        """Mark the unsent steps as dropped on this rank; how many were not dropped before."""
        dropped = len(self.unsent) - self.skip
        self.skip = len(self.unsent)
        return dropped

    def collect(self) -> tuple[torch.Tensor, list[int]] | None:
        """Wait for the collective in flight; the ``[N, 4, C]`` rows and examples of its kept steps.

        One host synchronisation: the metadata columns are read back.

        Raises:
            noisescale.distributed.DistributedSetupError: if the ranks ran different numbers of
                backward passes in a step.
            ValueError: if a step drew more than ``dataset_size`` examples.
        """
        collective, self.collective = self.collective, None
        if collective is None:
            return None
        collective.work.wait()
        if collective.skip >= len(collective.backward_passes):
            return None
        if self.sharded:
            collective = collective._replace(big=self._summed_big(collective))
        if self.method == "per_example":
            rows, examples = self._per_example_rows(collective)
        else:
            rows, examples = self._microbatch_stats(collective)
        return rows[collective.skip :], examples[collective.skip :]

    def _summed_big(self, collective: _Collective) -> torch.Tensor:
        """``[N, C]``: each step's ``|.grad|^2``, the sum of every rank's shard (FSDP2)."""
        n_cells = collective.big.shape[1]
        if self.method == "per_example":
            return collective.outputs[0][:, -n_cells:]
        parts = torch.stack(collective.outputs)[..., -n_cells:].sum(0)  # [M, C]: summed over ranks
        return torch.stack([rows.sum(0) for rows in parts.split(collective.backward_passes)])

    def _per_example_rows(self, collective: _Collective) -> tuple[torch.Tensor, list[int]]:
        summed = collective.outputs[0]  # [N, 3 C + 3]
        n_cells = collective.big.shape[1]
        matrices, examples, local_scale = [], [], []
        for columns in summed[:, 3 * n_cells : 3 * n_cells + 3].tolist():
            row = PerExampleRow.of(columns)
            check_within_dataset(row.examples, self.dataset_size)
            weight, weight2, scale = row.weight, row.weight2, [1.0, 1.0, 1.0]
            if self.placeholder_factors:  # the sums were taken with a_n = 1; in truth a_n = W / B
                alpha = self.world_size / row.examples
                weight, weight2, scale = (
                    alpha * row.examples,
                    alpha**2 * row.examples,
                    [alpha**-2, 1 / alpha, 1.0],
                )
            matrix = per_example_matrix(
                row.examples, weight, weight2, self.world_size, self.dataset_size, summed.device
            )
            matrices.append(matrix * torch.tensor(scale, dtype=torch.float64, device=summed.device))
            examples.append(row.examples)
            local_scale.append(scale[1] / weight)  # sum_i c_i |g_i|^2 / sum c, every rank's passes
        x = torch.cat([summed[:, : 2 * n_cells].unflatten(1, (2, n_cells)), collective.big[:, None]], 1)
        rows = torch.stack(matrices) @ x  # [N, 4, 3] @ [N, 3, C]
        per_step = torch.tensor(local_scale, dtype=torch.float64).to(summed.device)[:, None]
        local = summed[:, 2 * n_cells : 3 * n_cells] * per_step  # [N, C]
        rows[:, 2] = torch.minimum(rows[:, 2], local)  # the tighter of the two Jensen bounds
        return rows, examples

    def _microbatch_stats(self, collective: _Collective) -> tuple[torch.Tensor, list[int]]:
        gathered = torch.stack(collective.outputs)  # [W, M, C + 2]
        n_cells = collective.big.shape[1]
        meta = [[MicrobatchRow.of(r) for r in rank] for rank in gathered[..., n_cells : n_cells + 2].tolist()]
        matrices, examples, start = [], [], 0
        for m_t in collective.backward_passes:  # each step's k = W m_t backward passes, rank-major
            per_rank = [rank[start : start + m_t] for rank in meta]
            passes = sorted({r.backward_passes for rows in per_rank for r in rows})
            if passes != [m_t]:
                raise nsdist.DistributedSetupError(
                    f"the ranks ran different numbers of backward passes in one step ({m_t} here, "
                    f"{passes} in all): call update() on every rank after the same number of micro-steps"
                )
            sizes = [tuple(r.examples for r in rows) for rows in per_rank]
            step_examples = sum(map(sum, sizes))
            check_within_dataset(step_examples, self.dataset_size)
            factors = [
                c
                for rank_sizes in sizes
                for c in loss_factors(
                    rank_sizes,
                    reduction=self.reduction,
                    accumulation=self.accumulation,
                    step_examples=step_examples,
                    world_size=self.world_size,
                )
            ]
            all_sizes = tuple(b for rank_sizes in sizes for b in rank_sizes)
            matrices.append(
                microbatch_matrix(
                    all_sizes, tuple(factors), self.world_size, self.dataset_size, gathered.device
                )
            )
            examples.append(step_examples)
            start += m_t
        ranks = gathered[..., :n_cells]  # [W, M, C]
        m = collective.backward_passes
        if len(set(m)) == 1:  # one product: [N, 4, W m + 1] @ [N, W m + 1, C]
            small = ranks.unflatten(1, (len(m), m[0])).transpose(0, 1).flatten(1, 2)
            x = torch.cat([small, collective.big[:, None]], 1)
            return torch.stack(matrices) @ x, examples
        rows = [  # steps with different numbers of backward passes
            matrix @ torch.cat([part.flatten(0, 1), big[None]])
            for matrix, part, big in zip(matrices, ranks.split(m, dim=1), collective.big, strict=True)
        ]
        return torch.stack(rows), examples
