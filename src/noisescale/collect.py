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

__all__ = ["GradientRecorder", "MicrobatchRecord", "squared_norms"]


@dataclass
class MicrobatchRecord:
    """What one backward pass contributed, already divided by the AMP scale squared."""

    sq_norms: torch.Tensor | None  # [P] float64 squared norms of this backward's contribution (microbatch)
    per_example: torch.Tensor | None  # [N, G] squared norms of each example's contribution


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[P]`` float64 squared L2 norms of ``P`` tensors: one fused kernel, no host sync.

    The norms are taken in at least float32 and squared in float64, so float16
    gradients with norms above 256 do not overflow.
    """
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch._foreach_norm(list(tensors), dtype=dtype)  # type: ignore[misc]
    return torch.stack(norms).to(torch.float64).square()


def _stack_sq(norms: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``[P]`` float64 squares of per-parameter norms (0-d tensors); None (no gradient) is zero."""
    present = [n for n in norms if n is not None]
    if len(present) < len(norms):
        zero = torch.zeros((), dtype=present[0].dtype, device=present[0].device)
        present = [zero if n is None else n for n in norms]
    return torch.stack(present).to(torch.float64).square()


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

    One tensor hook per parameter takes the norm of the gradient backward computed
    for it, right before autograd adds it into ``.grad``, and lets go of it: autograd
    can then move the gradient into an empty ``.grad`` instead of copying it (holding
    the gradients until all have arrived, as ``register_multi_grad_hook`` does, costs a
    full copy of them on every step's first backward). The first hook of a backward
    queues a callback that runs when that backward has finished and files its record.

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
        self._norms: list[torch.Tensor | None] = [None] * len(self.params)  # this backward's, per parameter
        self._task: int | None = None  # graph task whose end-of-backward callback is queued
        self._handles = [p.register_hook(partial(self._on_grad, i)) for i, p in enumerate(self.params)]

    def _on_grad(self, i: int, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # the first gradient of this backward
            self._task = task
            self._norms = [None] * len(self.params)  # nothing left from a backward that raised
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward)  # type: ignore[attr-defined]
        if self.per_example is None:
            dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32  # fp16: no overflow
            self._norms[i] = torch.linalg.vector_norm(grad, dtype=dtype)

    def _on_backward(self) -> None:
        """End of a backward pass: file its record."""
        self._task = None
        norms, self._norms = self._norms, [None] * len(self.params)
        per_example = self.per_example.pop() if self.per_example is not None else None
        sq = None if self.per_example is not None else _stack_sq(norms)
        scale = _amp_scale(self.scaler)
        if scale is not None:
            inv = scale.to(torch.float64).reciprocal().square()
            sq = None if sq is None else sq * inv
            per_example = None if per_example is None else per_example.to(torch.float64) * inv
        self.records.append(MicrobatchRecord(sq, per_example))
        if self.take_snapshot:
            self.snapshot = self.accumulated_sq_norms()

    def accumulated_sq_norms(self) -> torch.Tensor:
        """``[P]`` float64 squared norms of the accumulated ``.grad`` (the big batch), AMP scale removed.

        Raises:
            RuntimeError: if no parameter has a gradient.
        """
        grads = [p.grad for p in self.params]
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            raise RuntimeError("no parameter has a .grad: call meter.update() before optimizer.zero_grad()")
        sq = squared_norms([grads[i] for i in present])  # type: ignore[misc]
        if len(present) < len(grads):
            index = torch.tensor(present, device=sq.device)
            sq = torch.zeros(len(grads), dtype=torch.float64, device=sq.device).index_copy_(0, index, sq)
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
