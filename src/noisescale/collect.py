"""Squared gradient norms recorded during the user's own backward passes.

A tensor hook on every trainable parameter sees the gradient each backward pass
computed for it, BEFORE it is added into ``.grad``, and takes its squared norm at
once (the tensor may be a buffer that is reused later, e.g. by a fused kernel's
autograd Function), unless the backward is a ``torch.autograd.grad`` call, which never
reaches ``.grad``. When the backward has finished, its record is filed (no host
synchronisation, no tensor operation). Once per optimiser step
:meth:`GradientRecorder.sq_norms` turns the step's records and the accumulated
``.grad`` (the big batch) into one ``[k + 1, P]`` tensor of squared norms
(:func:`squared_norms` for ``.grad``: a BLAS dot per large tensor, one fused norm
kernel for the small ones; the meter sums parameters into groups). With per-example
kernels attached, a record holds their ``[N, G]`` per-example squared norms per group
instead.

AMP: with a ``torch.amp.GradScaler`` the recorded gradients are scaled by the
scaler's current scale ``s``; squared norms are divided by ``s**2`` on the device,
using the scale in force at that backward (GradScaler changes it only in
``update()``, i.e. between optimiser steps). Overflowing steps produce non-finite
norms, which the meter skips and counts.

Shape letters: ``P`` parameters, ``G`` parameter groups, ``N`` examples in a micro-batch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
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
    """What one backward pass contributed.

    ``values`` (``microbatch``): per parameter, the 0-d squared norm of this backward's
    gradient, or None (it had none), loss-scaled under AMP. ``per_example``: ``[N, G]``
    squared norms of each example's contribution, already divided by the AMP scale squared.
    """

    values: list[torch.Tensor | None] | None = None
    per_example: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # 0-d float64 AMP scale in force at this backward


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


def squared_norms(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``[P]`` float64 squared L2 norms of ``P`` tensors (zero for None), no host sync.

    Sparse tensors and those of at least :data:`EAGER_NUMEL` elements go through
    :func:`squared_norm`; the others through one fused norm kernel (:func:`_square_small`).
    """
    return _squared(_norm_or_hold(t) for t in tensors)


def _norm_or_hold(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient's 0-d squared norm if it is large (:func:`_eager`), else itself, at least 1-D.

    :func:`_squared` norms the held small ones together. A 0-d gradient (a scalar
    parameter) becomes 1-D, since 0-d entries are squared norms already.
    """
    if tensor is None:
        return None
    if _eager(tensor):
        return squared_norm(tensor)
    return tensor if tensor.dim() else tensor.view(1)


def _squared(values: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """``[n]`` float64 squared norms from :func:`_norm_or_hold` values.

    The 0-d values are squared norms already; the others are normed together.
    """
    values = list(values)
    _square_small(values)
    return _stack_float64(values)


def _eager(tensor: torch.Tensor) -> bool:
    """Whether a gradient is normed on its own (:func:`squared_norm`) rather than with the small ones."""
    return tensor.is_sparse or tensor.numel() >= EAGER_NUMEL


def _square_small(values: list[torch.Tensor | None]) -> None:
    """Replace the gradients in ``values`` (not 0-d) by their 0-d squared norms, in one fused kernel.

    The 0-d entries are squared norms already. Norms are taken and squared in at least
    float32, so float16 gradients with norms above 256 do not overflow.
    """
    small = [i for i, v in enumerate(values) if v is not None and v.dim() > 0]
    if not small:
        return
    grads = [values[i] for i in small]
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32  # type: ignore[union-attr]
    norms = torch._foreach_norm(grads, dtype=dtype)  # type: ignore[arg-type]
    for i, sq in zip(small, torch._foreach_mul(norms, norms), strict=True):
        values[i] = sq


def _stack_float64(values: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``[n]`` float64 from ``n`` 0-d tensors, zero where None (one stack when their dtypes agree)."""
    like = next(v for v in values if v is not None)
    if any(v is None for v in values):
        zero = like.new_zeros(())
        values = [zero if v is None else v for v in values]
    if all(v.dtype == like.dtype for v in values):  # type: ignore[union-attr]
        return torch.stack(values).to(torch.float64)  # type: ignore[arg-type]
    return torch.stack([v.to(torch.float64) for v in values])  # type: ignore[union-attr]


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


_NO_GRAD = "no parameter has a .grad: call meter.update() before optimizer.zero_grad()"
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
    full copy of them on every step's first backward). Small gradients are normed in
    their hooks too: holding them until later would be wrong when autograd hands a
    hook a buffer that is overwritten afterwards (a fused kernel's workspace, a reused
    ``backward(gradient)`` tensor), and would keep k copies of them until
    :meth:`sq_norms`. The first hook of a backward queues the callback that runs at
    its end and files the record, with no tensor operation. One hook per parameter and
    no Python work per step beyond it: on a small model each hook call and each tensor
    operation is a visible part of a step.

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
        self._held: dict[int, list[torch.Tensor | None]] = {}  # running graph task -> its values in .grad
        self._record_of: dict[int, MicrobatchRecord] = {}  # running graph task -> the record it adds to
        self._current: MicrobatchRecord | None = None  # record of the newest backward call
        self._newest_task = -1  # graph task ids only grow: a smaller one encloses a newer one
        self._seen = [False] * len(self.params)  # parameters with a value in the current record
        self._split: int | None = None  # a parameter whose gradient came in two parts
        self._raised = False  # a backward raised halfway since the last pop
        self._handles = [p.register_hook(partial(self._on_grad, i)) for i, p in enumerate(self.params)]

    def _on_grad(self, i: int, grad: torch.Tensor) -> None:
        """Tensor hook: this backward's gradient of parameter ``i``, right before it is added to ``.grad``."""
        task = torch._C._current_graph_task_id()
        held = self._held.get(task)
        if held is None:  # the first gradient of this graph task
            if not _adds_into_grad():
                return
            held = self._start(task)
        if self.per_example is None:
            if grad.requires_grad:  # backward(create_graph=True): the norm needs no graph
                grad = grad.detach()
            held[i] = squared_norm(grad)
        if self._seen[i]:
            self._split = i
        self._seen[i] = True

    def _start(self, task: int) -> list[torch.Tensor | None]:
        """Open graph task ``task``: queue its end-of-backward callback; choose the record it adds to.

        A task that starts while another one runs (``self._held`` not empty, and two
        backward calls on the threads' stacks) runs inside it (reentrant checkpointing); one
        older than the newest task seen encloses that newest one, which ended first. Either
        adds to the last record. Unfinished tasks with no call left on any stack raised
        halfway: they are dropped, and so is the step (:meth:`problem`), whose ``.grad``
        holds part of their gradient. A backward call that starts with every ``.grad``
        None (``zero_grad()`` since the last records) starts the step afresh: the earlier
        records, and what a backward that raised left, are gone from ``.grad``.
        """
        if self._held and _backward_calls_running() < 2:  # the unfinished ones raised: forget them
            self._held.clear()
            self._record_of.clear()
            self._raised = True
        nested = bool(self._held) or task < self._newest_task
        if not nested and (self.records or self._raised) and all(p.grad is None for p in self.params):
            self.records.clear()
            self._raised = False
            if self.per_example is not None:
                self.per_example.drop(keep=task)
        if not nested or self._current is None:
            self._seen = [False] * len(self.params)
            self._current = MicrobatchRecord()
        self._newest_task = max(self._newest_task, task)
        self._record_of[task] = self._current
        held = self._held[task] = [None] * len(self.params)
        _queue_callback(partial(self._on_backward, task))
        return held

    def _on_backward(self, task: int) -> None:
        """End of graph task ``task``: add its values to its backward call's record, filed once.

        Only the AMP scale in force is taken now; stacking the values into a tensor waits
        for :meth:`sq_norms`, once per optimiser step.
        """
        held = self._held.pop(task)
        record = self._record_of.pop(task)
        scale = _amp_scale(self.scaler)
        if self.per_example is not None:
            per_example = self.per_example.pop(task)
            if per_example is not None and scale is not None:
                per_example = per_example.to(torch.float64) / scale.to(torch.float64).square()
            record.per_example = _add(record.per_example, per_example)
        else:
            # One parameter's value comes from one graph task (else _split), so the parts merge.
            record.values = (
                held
                if record.values is None
                else [a if b is None else b for a, b in zip(record.values, held, strict=True)]
            )
            if scale is not None and record.scale is None:
                record.scale = scale.to(torch.float64)  # a copy: GradScaler.update() changes it in place
        if not self.records or self.records[-1] is not record:  # filed when its first task ends
            self.records.append(record)
        if self.take_snapshot:  # after the callbacks already queued, e.g. DDP's copy of the all-reduced mean
            _queue_callback(self._take_snapshot)

    def _take_snapshot(self) -> None:
        self.snapshot = self.accumulated_sq_norms()

    def sq_norms(self, records: Sequence[MicrobatchRecord], *, big: bool = False) -> torch.Tensor:
        """``[k, P]`` float64 squared norms of each record's gradient per parameter, AMP scale removed.

        With ``big``, one more row last: the accumulated ``.grad`` (the big batch), or the
        :attr:`snapshot` taken after the last backward when there is one. One stack for
        the whole step; zero where a backward gave a parameter no gradient.

        Raises:
            ValueError: if a record holds per-example norms only (``per_example`` recorder).
            RuntimeError: with ``big``, if no parameter has a ``.grad``.
        """
        if any(r.values is None for r in records):
            raise ValueError("these records hold per-example norms, not per-backward values")
        values = [v for r in records for v in r.values]  # type: ignore[union-attr]
        scales = [r.scale for r in records]
        snapshot = self.snapshot if big else None
        if big and snapshot is None:
            if all(p.grad is None for p in self.params):
                raise RuntimeError(_NO_GRAD)
            values += [_norm_or_hold(p.grad) for p in self.params]
            scales.append(self._grad_scale())
        rows = [_squared(values).view(len(scales), -1)] if values else []
        if snapshot is not None:
            rows.append(snapshot[None])
            scales.append(None)
        out = torch.cat(rows) if len(rows) > 1 else rows[0]
        if any(s is not None for s in scales):
            one = torch.ones((), dtype=torch.float64, device=out.device)
            out = out / torch.stack([one if s is None else s for s in scales])[:, None].square()
        return out

    def accumulated_sq_norms(self) -> torch.Tensor:
        """``[P]`` float64 squared norms of the accumulated ``.grad`` (the big batch), AMP scale removed.

        Raises:
            RuntimeError: if no parameter has a gradient.
        """
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            raise RuntimeError(_NO_GRAD)
        sq = squared_norms(grads)
        scale = self._grad_scale()
        return sq if scale is None else sq / scale.square()

    def _grad_scale(self) -> torch.Tensor | None:
        """0-d float64 AMP scale of ``.grad``: None unless scaled and not yet unscaled."""
        scale = _amp_scale(self.scaler)
        if scale is None or _amp_unscaled(self.scaler):
            return None
        return scale.to(torch.float64)

    def problem(self) -> str | None:
        """Why the records since the last pop do not describe whole backward passes, or None.

        Call it between backward passes (e.g. in ``meter.update()``): a backward whose
        end-of-backward callback has not run by then raised halfway, whether or not
        other backward passes ran after it.
        """
        if self._held or self._raised:
            return _RAISED
        return None if self._split is None else _SPLIT.format(i=self._split)

    def pop(self) -> list[MicrobatchRecord]:
        """The records since the last pop, oldest first; forgets backward passes that raised."""
        out, self.records = self.records, []
        if self.per_example is not None:  # drop the parts of backward passes that raised
            self.per_example.pop()
        self._raised = False
        self._held.clear()
        self._record_of.clear()
        self._current = None
        self._seen = [False] * len(self.params)
        self._split = None
        return out

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()
        if self.per_example is not None:
            self.per_example.remove()


def _queue_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` at the end of the running backward, after those queued before it."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)  # type: ignore[attr-defined]


def _adds_into_grad() -> bool:
    """Whether the running graph task adds the hooked parameter's gradient into ``.grad``.

    Called from a parameter's tensor hook, where the node autograd is running is the
    parameter's AccumulateGrad node. True for ``backward()`` (also with ``inputs=``, for
    the parameters it names), False inside ``torch.autograd.grad``, which returns
    gradients without touching ``.grad``: there autograd refuses to say whether it will
    run a parameter's AccumulateGrad node.
    """
    try:
        return torch._C._will_engine_execute_node(torch._C._current_autograd_node())
    except RuntimeError:  # "A leaf node was passed ... while running autograd.grad()"
        return False


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
