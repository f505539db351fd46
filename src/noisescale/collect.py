"""Squared gradient norms recorded during the user's own backward passes.

A tensor hook on every trainable parameter sees the gradient each backward pass
computed for it, BEFORE it is added into ``.grad``, and takes its squared norm (large
parameters) or holds it (small ones); the parameter's post-accumulate-grad hook keeps
that value once it has reached ``.grad``. When the backward has finished, its record
is filed (no host synchronisation): the squared norm of this micro-batch's
contribution per parameter (the meter sums parameters into groups) and, when
per-example kernels are attached, their ``[N, G]`` per-example squared norms per
group. The accumulated gradient (the big batch) is read from ``.grad`` once per
optimiser step by :meth:`GradientRecorder.accumulated_sq_norms` (:func:`squared_norms`:
a BLAS dot per large tensor, one fused norm for the small ones).

AMP: with a ``torch.amp.GradScaler`` the recorded gradients are scaled by the
scaler's current scale ``s``; squared norms are divided by ``s**2`` on the device,
using the scale in force at that backward (GradScaler changes it only in
``update()``, i.e. between optimiser steps). Overflowing steps produce non-finite
norms, which the meter skips and counts.

Shape letters: ``P`` parameters, ``G`` parameter groups, ``N`` examples in a micro-batch.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from types import FrameType
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
    bfloat16, strided such as channels_last) a norm taken in float32 (float64 for
    float64), which cannot overflow for half-precision values. A sparse tensor is coalesced first.
    """
    if tensor.is_sparse:  # nn.Embedding(sparse=True): repeated rows sum first
        return squared_norm(tensor.coalesce().values())
    if tensor.is_contiguous() and tensor.dtype in (torch.float32, torch.float64):
        flat = tensor.view(-1)
        return torch.dot(flat, flat)
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(tensor, dtype=dtype).square()


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


_RAISED = (
    "a backward pass raised before it finished since the last update(): part of its gradient is already "
    "in .grad, so this step's gradients are not the sum of whole backward passes. Skip the step: call "
    "optimizer.zero_grad() (the meter has dropped the step's records) and continue with the next one."
)
_SPLIT = (
    "parameter #{i} of the meter received gradients from two backward passes inside one .backward() "
    "call: reentrant activation checkpointing (torch.utils.checkpoint.checkpoint(..., use_reentrant=True)) "
    "with the parameter used both inside and outside a checkpointed function, or in two of them. Its "
    "per-backward norm cannot be recovered from the parts; use use_reentrant=False. The meter has dropped "
    "the step's records; call optimizer.zero_grad() and continue."
)


class GradientRecorder:
    """Hooks that record the squared norms of every backward's gradients.

    One tensor hook per parameter sees the gradient backward computed for it, right
    before autograd adds it into ``.grad``. For a large parameter (at least
    ``EAGER_NUMEL`` elements) the hook takes its norm and lets go of it: autograd can
    then move the gradient into an empty ``.grad`` instead of copying it (holding the
    gradients until all have arrived, as ``register_multi_grad_hook`` does, costs a
    full copy of them on every step's first backward). Small parameters' gradients are
    held and normed together in one fused kernel when the backward has finished:
    per-call overhead, not bandwidth, is their cost. The parameter's
    post-accumulate-grad hook then keeps the value: a gradient counts only once it is
    in ``.grad``. The first such hook of a backward queues the callback that runs at
    its end and files the record.

    Which backward passes make a record: exactly the calls that add into ``.grad``
    (``loss.backward()``, ``torch.autograd.backward``), one record per call.
    ``torch.autograd.grad(loss, params)`` (a gradient penalty, a meta-gradient) never
    reaches ``.grad`` and files nothing; a penalty term backpropagated with the loss
    is part of that backward's record, as it is part of ``.grad``. A backward that
    autograd runs inside another one (``torch.utils.checkpoint`` with
    ``use_reentrant=True``) is merged into the enclosing call's record.

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
        self._incoming: list[torch.Tensor | None] = [None] * len(self.params)  # seen by a tensor hook
        self._held: dict[int, list[torch.Tensor | None]] = {}  # running graph task -> its values in .grad
        self._record_of: dict[int, MicrobatchRecord] = {}  # running graph task -> the record it adds to
        self._current: MicrobatchRecord | None = None  # record of the newest backward call
        self._newest_task = -1  # graph task ids only grow: a smaller one encloses a newer one
        self._seen = [False] * len(self.params)  # parameters with a value in the current record
        self._split: int | None = None  # a parameter whose gradient came in two parts
        self._index = functools.lru_cache(maxsize=64)(self._make_index)  # parameter subsets -> index tensors
        self._handles = [p.register_hook(partial(self._on_grad, i)) for i, p in enumerate(self.params)]
        self._handles += [
            p.register_post_accumulate_grad_hook(partial(self._on_accumulated, i))
            for i, p in enumerate(self.params)
        ]

    def _on_grad(self, i: int, grad: torch.Tensor) -> None:
        """Tensor hook: this backward's gradient of parameter ``i``, before it reaches ``.grad``."""
        if self.per_example is None:
            grad = grad.detach()  # backward(create_graph=True): the norm needs no graph
            self._incoming[i] = squared_norm(grad) if self._eager[i] else grad

    def _on_accumulated(self, i: int, param: nn.Parameter) -> None:
        """Post-accumulate-grad hook: the value just seen went into ``.grad``; keep it."""
        task = torch._C._current_graph_task_id()
        held = self._held.get(task)
        if held is None:  # the first gradient this backward put into .grad
            held = self._start(task)
        held[i], self._incoming[i] = self._incoming[i], None
        if self._seen[i]:
            self._split = i
        self._seen[i] = True

    def _start(self, task: int) -> list[torch.Tensor | None]:
        """Open graph task ``task``: queue its end-of-backward callback; choose the record it adds to.

        A task that starts while another one runs (``self._held`` not empty, and two
        backward calls on the threads' stacks) runs inside it (reentrant checkpointing); one
        older than the newest task seen encloses that newest one, which ended first. Either
        adds to the last record. Unfinished tasks with no call left on any stack raised
        halfway: they are dropped.
        """
        if self._held and _backward_calls_running() < 2:  # the unfinished ones raised: forget them
            self._held.clear()
            self._record_of.clear()
        nested = bool(self._held) or task < self._newest_task
        if not nested or self._current is None:
            self._seen = [False] * len(self.params)
            self._current = MicrobatchRecord(None, None)
        self._newest_task = max(self._newest_task, task)
        self._record_of[task] = self._current
        held = self._held[task] = [None] * len(self.params)
        torch.autograd.Variable._execution_engine.queue_callback(partial(self._on_backward, task))  # type: ignore[attr-defined]
        return held

    def _on_backward(self, task: int) -> None:
        """End of graph task ``task``: add its norms to its backward call's record, filed once."""
        held = self._held.pop(task)
        record = self._record_of.pop(task)
        per_example = self.per_example.pop() if self.per_example is not None else None
        sq = None if self.per_example is not None else self._held_sq_norms(held)
        scale = _amp_scale(self.scaler)
        if scale is not None:
            inv = scale.to(torch.float64).reciprocal().square()
            sq = None if sq is None else sq * inv
            per_example = None if per_example is None else per_example.to(torch.float64) * inv
        record.sq_norms = _add(record.sq_norms, sq)
        record.per_example = _add(record.per_example, per_example)
        if not self.records or self.records[-1] is not record:  # filed when its first task ends
            self.records.append(record)
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
        out = torch.zeros(len(self.params), dtype=values.dtype, device=values.device)
        return out.index_copy_(0, self._index(tuple(positions)), values)

    def _make_index(self, positions: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(positions, device=self.params[0].device)

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

    def problem(self) -> str | None:
        """Why the records since the last pop do not describe whole backward passes, or None.

        Call it between backward passes (e.g. in ``meter.update()``): a backward whose
        end-of-backward callback has not run by then raised halfway.
        """
        if self._held:
            return _RAISED
        return None if self._split is None else _SPLIT.format(i=self._split)

    def pop(self) -> list[MicrobatchRecord]:
        """The records since the last pop, oldest first; forgets backward passes that raised."""
        out, self.records = self.records, []
        if self._held and self.per_example is not None:  # a backward raised: drop its per-example parts
            self.per_example.pop()
        self._held.clear()
        self._record_of.clear()
        self._current = None
        self._incoming = [None] * len(self.params)
        self._seen = [False] * len(self.params)
        self._split = None
        return out

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()
        if self.per_example is not None:
            self.per_example.remove()


def _backward_calls_running() -> int:
    """How many ``backward``/``autograd.grad`` calls are in progress, on every thread.

    Counts the frames of the public entry points ``torch.autograd.backward`` (which
    ``Tensor.backward`` calls) and ``torch.autograd.grad``; used only when a graph task
    starts while another one has not finished (nested, or one that raised).
    """
    codes = (torch.autograd.backward.__code__, torch.autograd.grad.__code__)
    count = 0
    for frame in sys._current_frames().values():
        walk: FrameType | None = frame
        while walk is not None:
            count += walk.f_code in codes
            walk = walk.f_back
    return count


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where None is nothing."""
    return b if a is None else a if b is None else a + b
