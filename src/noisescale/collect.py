"""Squared gradient norms recorded during the user's own backward passes.

One ``torch.autograd.graph.register_multi_grad_hook`` over all trainable
parameters fires once per backward pass with that pass's gradients, BEFORE they
are added into ``.grad``. It records the squared norm of this micro-batch's
contribution per parameter (one fused ``torch._foreach_norm``, no host
synchronisation; the meter sums parameters into groups) and, when per-example
kernels are attached, their ``[N, G]`` per-example squared norms per group. The
accumulated gradient (the big batch) is read from ``.grad`` once per optimiser step
by :meth:`GradientRecorder.accumulated_sq_norms`.

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

    Args:
        params: the ``P`` trainable parameters, in a fixed order.
        scaler: optional GradScaler whose scale divides the recorded norms.
        per_example: optional per-example kernels, popped after each backward; when
            given, the micro-batch norms are not taken (the per-example estimator
            needs only the per-example norms and ``.grad``).
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        *,
        scaler: torch.amp.GradScaler | None = None,
        per_example: PerExampleNorms | None = None,
    ) -> None:
        self.params = list(params)
        self.scaler = scaler
        self.per_example = per_example
        self.records: list[MicrobatchRecord] = []
        self._handle = torch.autograd.graph.register_multi_grad_hook(self.params, self._on_backward)

    def _sq_norms(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``[P]`` float64 squared norms of one tensor per parameter; None counts as zero."""
        present = [i for i, t in enumerate(tensors) if t is not None]
        sq = squared_norms([tensors[i] for i in present])  # type: ignore[misc]
        if len(present) == len(tensors):
            return sq
        index = torch.tensor(present, device=sq.device)
        return torch.zeros(len(tensors), dtype=torch.float64, device=sq.device).index_copy_(0, index, sq)

    def _on_backward(self, grads: Sequence[torch.Tensor | None]) -> None:
        per_example = self.per_example.pop() if self.per_example is not None else None
        if all(g is None for g in grads):
            return
        sq = None if self.per_example is not None else self._sq_norms(grads)
        scale = _amp_scale(self.scaler)
        if scale is not None:
            inv = scale.to(torch.float64).reciprocal().square()
            sq = None if sq is None else sq * inv
            per_example = None if per_example is None else per_example.to(torch.float64) * inv
        self.records.append(MicrobatchRecord(sq, per_example))

    def accumulated_sq_norms(self) -> torch.Tensor:
        """``[P]`` float64 squared norms of the accumulated ``.grad`` (the big batch), AMP scale removed.

        Raises:
            RuntimeError: if no parameter has a gradient.
        """
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            raise RuntimeError("no parameter has a .grad: call meter.update() before optimizer.zero_grad()")
        sq = self._sq_norms(grads)
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
        self._handle.remove()
        if self.per_example is not None:
            self.per_example.remove()
