"""Squared gradient norms recorded during the user's own backward passes.

A tensor hook on every trainable parameter sees the gradient each backward pass
computed for it, BEFORE it is added into ``.grad``, and records its norm (no host
synchronisation); when the backward has finished, its record is filed: the squared
norm of this micro-batch's contribution per parameter (the meter sums parameters into
groups) and, when per-example kernels are attached, their ``[N, G]`` per-example
squared norms per group. The accumulated gradient (the big batch) is read from
``.grad`` once per optimiser step by :meth:`GradientRecorder.accumulated_sq_norms`
(one fused ``torch._foreach_norm``).

AMP: with a ``torch.amp.GradScaler`` the recorded gradients are scaled by the
scaler's current scale ``s``; squared norms are divided by ``s**2`` on the device,
using the scale in force at that backward (GradScaler changes it only in
``update()``, i.e. between optimiser steps). Overflowing steps produce non-finite
norms, which the meter skips and counts.

Shape letters: ``P`` parameters, ``G`` parameter groups, ``N`` examples in a micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from noisescale.per_example import PerExampleNorms

__all__ = ["EAGER_NUMEL", "GradientRecorder", "MicrobatchRecord", "squared_norm", "squared_norms"]

EAGER_NUMEL = 2**15  # parameters this large are normed in their own hook (see GradientRecorder)


@dataclass
class MicrobatchRecord:
    """What one backward pass contributed, already divided by the AMP scale squared."""

    sq_norms: torch.Tensor | None  # [P] float64 squared norms of this backward's contribution (microbatch)
    per_example: torch.Tensor | None  # [N, G] squared norms of each example's contribution


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """0-d squared L2 norm of one tensor, no host sync.

    A contiguous float32 or float64 tensor takes one BLAS dot product with itself, in
    its own dtype (about twice as fast as the norm kernel on CPUs); any other (float16,
    bfloat16, strided) a norm taken in float32, squared in float32, which cannot
    overflow for half-precision values. A sparse tensor is coalesced first.
    """
    if tensor.is_sparse:  # nn.Embedding(sparse=True): repeated rows sum first
        return squared_norm(tensor.coalesce().values())
    if tensor.is_contiguous() and tensor.dtype in (torch.float32, torch.float64):
        flat = tensor.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(tensor, dtype=torch.float32).square()


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[P]`` float64 squared L2 norms of ``P`` tensors, no host sync.

    Sparse tensors and those of at least :data:`EAGER_NUMEL` elements go through :func:`squared_norm`;
    the others through one fused norm kernel, taken in at least float32 and squared in
    float64, so float16 gradients with norms above 256 do not overflow.
    """
    large = [t.numel() >= EAGER_NUMEL or t.is_sparse for t in tensors]
    small = [t for t, big in zip(tensors, large, strict=True) if not big]
    if small:
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in small) else torch.float32
        small_sq = torch.stack(torch._foreach_norm(small, dtype=dtype)).to(torch.float64).square()  # type: ignore[misc]
        if len(small) == len(tensors):
            return small_sq
        rest = iter(small_sq.unbind())
    values = [squared_norm(t) if big else next(rest) for t, big in zip(tensors, large, strict=True)]
    return torch.stack(values).to(torch.float64)


def _amp_scale(scaler: torch.amp.GradScaler | None) -> torch.Tensor | None:
    """The scaler's current scale as a device tensor (no sync), or None when not scaling."""
    if scaler is None or not scaler.is_enabled() or scaler._scale is None:
        return None
    return scaler._scale


def _amp_unscaled(scaler: torch.amp.GradScaler | None) -> bool:
    """True when the user already called ``scaler.unscale_(optimizer)`` this step."""
    if scaler is None or not scaler.is_enabled():
        return False
    from torch.amp.grad_scaler import OptState

    return any(s["stage"] is OptState.UNSCALED for s in scaler._per_optimizer_states.values())


class GradientRecorder:
    """Hooks that record the squared norms of every backward's gradients.

    One tensor hook per parameter sees the gradient backward computed for it, right
    before autograd adds it into ``.grad``. For a large parameter (at least
    ``EAGER_NUMEL`` elements) the hook takes its norm and lets go of it: autograd can
    then move the gradient into an empty ``.grad`` instead of copying it (holding the
    gradients until all have arrived, as ``register_multi_grad_hook`` does, costs a
    full copy of them on every step's first backward). Small parameters' gradients are
    held and normed together in one fused kernel when the backward has finished:
    per-call overhead, not bandwidth, is their cost. The first hook of a backward
    queues the callback that runs then and files the record.

    Args:
        params: the ``P`` trainable parameters, in a fixed order.
        scaler: optional GradScaler whose scale divides the recorded norms.
        per_example: optional per-example kernels, popped after each backward; when
            given, the micro-batch norms are not taken (the per-example estimator
            needs only the per-example norms and ``.grad``).
        snapshot: also take the squared norms of the accumulated ``.grad`` at the end
            of every backward (:attr:`snapshot`), for gradients clipped before the
            meter reads them.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        *,
        scaler: torch.amp.GradScaler | None = None,
        per_example: PerExampleNorms | None = None,
        snapshot: bool = False,
    ) -> None:
        self.params = list(params)
        self.scaler = scaler
        self.per_example = per_example
        self.take_snapshot = snapshot
        self.records: list[MicrobatchRecord] = []
        self.snapshot: torch.Tensor | None = None  # [P] float64, set at the end of each backward
        self._eager = [p.numel() >= EAGER_NUMEL for p in self.params]
        self._held: list[torch.Tensor | None] = [None] * len(self.params)  # this backward's norm or gradient
        self._task: int | None = None  # graph task whose end-of-backward callback is queued
        self._positions: dict[tuple[int, ...], torch.Tensor] = {}  # parameter subsets -> index tensors
        self._handles = [p.register_hook(partial(self._on_grad, i)) for i, p in enumerate(self.params)]

    def _on_grad(self, i: int, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # the first gradient of this backward
            self._task = task
            self._held = [None] * len(self.params)  # nothing left from a backward that raised
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward)  # type: ignore[attr-defined]
        if self.per_example is None:
            self._held[i] = squared_norm(grad) if self._eager[i] else grad

    def _on_backward(self) -> None:
        """End of a backward pass: file its record."""
        self._task = None
        held, self._held = self._held, [None] * len(self.params)
        per_example = self.per_example.pop() if self.per_example is not None else None
        sq = None if self.per_example is not None else self._held_sq_norms(held)
        scale = _amp_scale(self.scaler)
        if scale is not None:
            inv = scale.to(torch.float64).reciprocal().square()
            sq = None if sq is None else sq * inv
            per_example = None if per_example is None else per_example.to(torch.float64) * inv
        self.records.append(MicrobatchRecord(sq, per_example))
        if self.take_snapshot:
            self.snapshot = self.accumulated_sq_norms()

    def _held_sq_norms(self, held: list[torch.Tensor | None]) -> torch.Tensor:
        """``[P]`` float64 squared norms from a backward's held norms (large) and gradients (small)."""
        eager = [i for i, h in enumerate(held) if h is not None and self._eager[i]]
        small = [i for i, h in enumerate(held) if h is not None and not self._eager[i]]
        parts = [torch.stack([held[i] for i in eager]).to(torch.float64)] if eager else []  # type: ignore[misc]
        if small:
            parts.append(squared_norms([held[i] for i in small]))  # type: ignore[misc]
        return self._place(parts[0] if len(parts) == 1 else torch.cat(parts), eager + small)

    def _place(self, values: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """``[P]``: ``values`` at the parameters ``positions``, zero elsewhere (no gradient)."""
        if positions == list(range(len(self.params))):
            return values
        index = self._positions.get(tuple(positions))
        if index is None:
            if len(self._positions) >= 64:
                self._positions.clear()
            index = self._positions[tuple(positions)] = torch.tensor(positions, device=values.device)
        return torch.zeros(len(self.params), dtype=values.dtype, device=values.device).index_copy_(
            0, index, values
        )

    def accumulated_sq_norms(self) -> torch.Tensor:
        """``[P]`` float64 squared norms of the accumulated ``.grad`` (the big batch), AMP scale removed.

        Raises:
            RuntimeError: if no parameter has a gradient.
        """
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not present:
            raise RuntimeError("no parameter has a .grad: call meter.update() before optimizer.zero_grad()")
        sq = self._place(squared_norms([self.params[i].grad for i in present]), present)  # type: ignore[misc]
        scale = _amp_scale(self.scaler)
        if scale is not None and not _amp_unscaled(self.scaler):
            sq = sq / scale.to(torch.float64).square()
        return sq

    def pop(self) -> list[MicrobatchRecord]:
        """The records since the last pop, oldest first."""
        out, self.records = self.records, []
        return out

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()
        if self.per_example is not None:
            self.per_example.remove()
