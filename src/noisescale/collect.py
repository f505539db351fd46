"""Squared gradient norms recorded during the user's own backward passes.

A tensor hook on every trainable parameter sees the gradient each backward pass
computed for it, BEFORE it is added into ``.grad``, and takes its norm at once, squared
later with all the others (the tensor may be a buffer that is reused later, e.g. by a
fused kernel's autograd Function), unless the backward is a ``torch.autograd.grad``
call, which never reaches ``.grad``. When the backward has finished, its record is filed (no host
synchronisation, no tensor operation). Once per optimiser step
:meth:`GradientRecorder.sq_norms` turns the step's records and the accumulated
``.grad`` (the big batch) into one ``[k + 1, P]`` tensor of squared norms
(:func:`squared_norms` for ``.grad``: a BLAS dot per large tensor, one fused norm
kernel for the small ones; the meter sums parameters into groups). With per-example
kernels attached, a record holds their ``[N, G]`` per-example squared norms per group
instead.

With a diagonal preconditioner (:mod:`noisescale.preconditioner`) every squared norm is
taken twice, plainly and weighted, ``|P^{1/2} g|^2 = sum_j P_j g_j^2``: the ``P`` weighted
columns follow the ``P`` plain ones (``[k + 1, 2 P]``), and the per-example kernels give
``[N, 2 G]``. Without one nothing of it runs.

AMP: with a ``torch.amp.GradScaler`` the gradients backward computes are scaled by
the scaler's current scale ``s`` (GradScaler changes it only in ``update()``, between
optimiser steps). They are unscaled (multiplied by ``1/s``, exact for GradScaler's
powers of two) before any square is taken: squaring first underflows float32 at
``s = 2**-70`` (a scale GradScaler's own back-off reaches after many overflows) and
overflows it at ``s >= 2**64``. A squared norm is therefore non-finite only when the
gradient itself is (an overflowing AMP step), and the meter skips and counts those.

Shape letters: ``P`` parameters, ``G`` parameter groups, ``N`` examples in a micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from noisescale import _torch_compat as tc
from noisescale.preconditioner import Preconditioner, weighted

if TYPE_CHECKING:
    from noisescale.per_example import PerExampleNorms

__all__ = [
    "DOT_NUMEL",
    "EAGER_NUMEL",
    "GradientRecorder",
    "MicrobatchRecord",
    "norm",
    "squared_norms",
]

EAGER_NUMEL = 2**15  # parameters this large are normed in their own hook (see GradientRecorder)
DOT_NUMEL = 2**20  # gradients this large are normed by a BLAS dot product (see norm)


@dataclass
class MicrobatchRecord:
    """What one backward pass contributed.

    ``values`` (``microbatch``; ``per_example`` under DDP): per parameter, the 0-d norm of
    this backward's gradient (squared in :meth:`GradientRecorder.sq_norms`), or None (it had
    none); with a preconditioner the ``P`` weighted ones follow. ``per_example``: ``[N, G]``
    (``[N, 2 G]``) squared norms of each example's contribution. Both with the AMP loss scale
    already removed.
    """

    values: list[torch.Tensor | None] | None = None
    per_example: torch.Tensor | None = None


_FULL = (torch.float32, torch.float64)  # unscaled before squaring; half types are normed in float32


def norm(tensor: torch.Tensor, inv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """0-d L2 norm of ``tensor * inv_scale``, no host sync.

    The recorder keeps norms and squares them all at once, in float64, when it stacks
    them (one operation per step instead of one per gradient and backward).

    A contiguous float32 or float64 tensor of at least :data:`DOT_NUMEL` elements takes one
    BLAS dot product with itself, in its own dtype (2-4 times as fast as the norm kernel
    there), and its square root; any other (smaller, float16, bfloat16, strided such as
    channels_last) a norm taken in float32 (float64 for float64), which cannot overflow for
    half-precision values. Below ``DOT_NUMEL`` the BLAS dot starts its threads for every
    call: with ``OMP_WAIT_POLICY=PASSIVE`` (sleeping OpenMP threads) that costs about 70 us a
    call on a 2-core CPU against 2-18 us for the norm kernel, and 120 such calls a step cost
    the shakespeare model's ``microbatch`` meter 6% of its step. A sparse tensor is coalesced
    first.

    Args:
        tensor: a gradient, any shape and floating dtype.
        inv_scale: optional 0-d float32 ``1/s`` (AMP loss scale ``s``,
            :func:`noisescale._torch_compat.scaler_inverse_scale`).
            Float32/float64 gradients are multiplied by it before the squares are taken
            (one elementwise pass): ``(g s)^2`` underflows float32 at ``s = 2**-70``
            and overflows it at ``s >= 2**64``. A half-precision gradient's norm is taken
            in float32 first (it cannot under- or overflow there), then multiplied.

    Returns:
        0-d tensor, float32 (float64 for float64 input) on the tensor's device.
    """
    if tensor.is_sparse:  # nn.Embedding(sparse=True): repeated rows sum first
        return norm(tensor.coalesce().values(), inv_scale)
    if inv_scale is not None and tensor.dtype in _FULL:
        tensor = tensor * inv_scale.to(tensor.dtype)
        inv_scale = None
    if tensor.dtype in _FULL and tensor.numel() >= DOT_NUMEL and tensor.is_contiguous():
        flat = tensor.view(-1)
        return torch.dot(flat, flat).sqrt()
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    value = torch.linalg.vector_norm(tensor, dtype=dtype)
    return value if inv_scale is None else value * inv_scale


def squared_norms(
    tensors: Sequence[torch.Tensor | None], inv_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``[P]`` float64 squared L2 norms of ``P`` tensors times ``inv_scale`` (zero for None), no host sync.

    Sparse tensors and those of at least :data:`EAGER_NUMEL` elements go through
    :func:`norm`; the others through one fused norm kernel (:func:`_norm_small`).
    """
    return _squared([_norm_or_hold(t, inv_scale) for t in tensors], inv_scale)


def _norm_or_hold(tensor: torch.Tensor | None, inv_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """A gradient's 0-d norm if it is large (:func:`_eager`), else itself, at least 1-D.

    :func:`_squared` norms the held small ones together. A 0-d gradient (a scalar
    parameter) becomes 1-D, since 0-d entries are norms already.
    """
    if tensor is None:
        return None
    if _eager(tensor):
        return norm(tensor, inv_scale)
    return tensor if tensor.dim() else tensor.view(1)


def _squared(values: list[torch.Tensor | None], inv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` float64 squared norms from :func:`_norm_or_hold` values (and the recorder's 0-d norms).

    The 0-d values are norms already; the others are normed together; all are squared
    at once, in float64.
    """
    _norm_small(values, inv_scale)
    return _stack_float64(values).square()


def _eager(tensor: torch.Tensor) -> bool:
    """Whether a gradient is normed on its own (:func:`norm`) rather than with the small ones."""
    return tensor.is_sparse or tensor.numel() >= EAGER_NUMEL


def _norm_small(values: list[torch.Tensor | None], inv_scale: torch.Tensor | None = None) -> None:
    """Replace the gradients in ``values`` (not 0-d) by their 0-d norms times ``inv_scale``.

    One fused norm kernel for all of them. The 0-d entries are norms already.
    Norms are taken in at least float32, so float16 gradients with norms above 256 do
    not overflow; float32/float64 gradients are unscaled first (see :func:`norm`), half
    ones after their norm is taken.
    """
    small = [i for i, v in enumerate(values) if v is not None and v.dim() > 0]
    if not small:
        return
    grads: list[torch.Tensor] = [values[i] for i in small]  # type: ignore[misc]
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    if inv_scale is None:
        norms = tc.foreach_norm(grads, dtype)
    else:
        grads = [g * inv_scale.to(g.dtype) if g.dtype in _FULL else g for g in grads]
        norms = tc.foreach_norm(grads, dtype)
        norms = [n if g.dtype in _FULL else n * inv_scale for n, g in zip(norms, grads, strict=True)]
    for i, value in zip(small, norms, strict=True):
        values[i] = value


def _stack_float64(values: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``[n]`` float64 from ``n`` 0-d tensors, zero where None (one stack when their dtypes agree)."""
    like = next(v for v in values if v is not None)
    if any(v is None for v in values):
        zero = like.new_zeros(())
        values = [zero if v is None else v for v in values]
    if all(v.dtype == like.dtype for v in values):  # type: ignore[union-attr]
        return torch.stack(values).to(torch.float64)  # type: ignore[arg-type]
    return torch.stack([v.to(torch.float64) for v in values])  # type: ignore[union-attr]


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
        scaler: optional GradScaler; the recorded norms are those of the unscaled gradients.
        per_example: optional per-example kernels, popped after each backward; when
            given, the micro-batch norms are not taken (the per-example estimator
            needs only the per-example norms and ``.grad``) unless ``backward_norms``.
        backward_norms: with ``per_example``, take each backward's squared norms too
            (``values``, the same pass as without kernels): under DDP the meter checks
            the all-reduced ``.grad`` against every rank's local backward gradients.
        snapshot: also take the squared norms of the accumulated ``.grad`` at the end
            of every backward (:attr:`snapshot`), for gradients clipped before the
            meter reads them.
        preconditioner: also take every squared norm weighted by its ``P`` (one more
            elementwise product and norm per gradient).
        hooked: the tensors each backward's gradient reaches, one per parameter, when they
            are not the parameters themselves: FSDP2's unsharded parameters
            (:mod:`noisescale.fsdp`), whose parameters' ``.grad`` is a DTensor read through its
            local shard.
        cleared: whether every gradient was cleared since the last records (a backward then
            starts the step afresh); default: every parameter's ``.grad`` is None.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        *,
        scaler: torch.amp.GradScaler | None = None,
        per_example: PerExampleNorms | None = None,
        snapshot: bool = False,
        backward_norms: bool = False,
        preconditioner: Preconditioner | None = None,
        hooked: Sequence[torch.Tensor] | None = None,
        cleared: Callable[[Sequence[nn.Parameter]], bool] | None = None,
    ) -> None:
        self.params = list(params)
        self._cleared = cleared or _no_grads
        self.preconditioner = preconditioner
        self._columns = len(self.params) * (1 if preconditioner is None else 2)
        self.scaler = scaler
        self.per_example = per_example
        self.backward_norms = per_example is None or backward_norms  # records hold ``values``
        self.take_snapshot = snapshot
        self.records: list[MicrobatchRecord] = []
        self.snapshot: torch.Tensor | None = None  # [P] float64, set at the end of each backward
        self._held: dict[int, list[torch.Tensor | None]] = {}  # running graph task -> its values in .grad
        self._inv_scale: dict[int, torch.Tensor | None] = {}  # running graph task -> 1/s (AMP), or None
        self._record_of: dict[int, MicrobatchRecord] = {}  # running graph task -> the record it adds to
        self._current: MicrobatchRecord | None = None  # record of the newest backward call
        self._newest_task = -1  # graph task ids only grow: a smaller one encloses a newer one
        self._seen = [False] * len(self.params)  # parameters with a value in the current record
        self._split: int | None = None  # a parameter whose gradient came in two parts
        self._raised = False  # a backward raised halfway since the last pop
        tc.check()  # a clear error now, not an AttributeError inside a backward hook
        if per_example is not None:
            per_example.set_scaler(scaler)
        targets = self.params if hooked is None else hooked
        self._handles = [p.register_hook(partial(self._on_grad, i)) for i, p in enumerate(targets)]

    def _on_grad(self, i: int, grad: torch.Tensor) -> None:
        """Tensor hook: this backward's gradient of parameter ``i``, right before it is added to ``.grad``."""
        task = tc.graph_task_id()
        held = self._held.get(task)
        if held is None:  # the first gradient of this graph task
            if not tc.current_node_adds_into_grad():
                return
            held = self._start(task)
        if self.backward_norms:
            if grad.requires_grad:  # backward(create_graph=True): the norm needs no graph
                grad = grad.detach()
            held[i] = norm(grad, self._inv_scale[task])  # squared with the others in sq_norms
            if self.preconditioner is not None:
                root = self.preconditioner.roots()[i]
                held[len(self.params) + i] = norm(weighted(grad, root), self._inv_scale[task])
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
            self._inv_scale.clear()
            self._record_of.clear()
            self._raised = True
        nested = bool(self._held) or task < self._newest_task
        if not nested and (self.records or self._raised) and self._cleared(self.params):
            self.records.clear()
            self._raised = False
            if self.per_example is not None:
                self.per_example.drop(keep=task)
        if not nested or self._current is None:
            self._seen = [False] * len(self.params)
            self._current = MicrobatchRecord()
        self._newest_task = max(self._newest_task, task)
        self._record_of[task] = self._current
        held = self._held[task] = [None] * self._columns
        self._inv_scale[task] = tc.scaler_inverse_scale(self.scaler)
        tc.queue_callback(partial(self._on_backward, task))
        return held

    def _on_backward(self, task: int) -> None:
        """End of graph task ``task``: add its values to its backward call's record, filed once.

        No tensor operation: stacking the values into a tensor waits for :meth:`sq_norms`,
        once per optimiser step.
        """
        held = self._held.pop(task)
        record = self._record_of.pop(task)
        self._inv_scale.pop(task, None)
        if self.per_example is not None:
            record.per_example = _add(record.per_example, self.per_example.pop(task))
        if self.backward_norms:
            # One parameter's value comes from one graph task (else _split), so the parts merge.
            record.values = (
                held
                if record.values is None
                else [a if b is None else b for a, b in zip(record.values, held, strict=True)]
            )
        if not self.records or self.records[-1] is not record:  # filed when its first task ends
            self.records.append(record)
        if self.take_snapshot:  # after the callbacks already queued, e.g. DDP's copy of the all-reduced mean
            tc.queue_callback(self._take_snapshot)

    def _take_snapshot(self) -> None:
        # None after a backward that left no .grad (FSDP2 without gradient sync): the step's last one has
        self.snapshot = None if _no_grads(self.params) else self.accumulated_sq_norms()

    def sq_norms(self, records: Sequence[MicrobatchRecord], *, big: bool = False) -> torch.Tensor:
        """``[k, P]`` float64 squared norms of each record's gradient per parameter, AMP scale removed.

        With ``big``, one more row last: the accumulated ``.grad`` (the big batch), or the
        :attr:`snapshot` taken after the last backward when there is one. One stack for
        the whole step; zero where a backward gave a parameter no gradient.
        With a preconditioner ``[k, 2 P]``: the weighted ones follow the plain ones.

        Raises:
            ValueError: if a record holds per-example norms only (``per_example`` recorder).
            RuntimeError: with ``big``, if no parameter has a ``.grad``.
        """
        if any(r.values is None for r in records):
            raise ValueError("these records hold per-example norms, not per-backward values")
        values = [v for r in records for v in r.values]  # type: ignore[union-attr]
        rows = len(records)
        snapshot = self.snapshot if big else None
        inv_scale = None
        if big and snapshot is None:
            if _no_grads(self.params):
                raise RuntimeError(_NO_GRAD)
            inv_scale = self._grad_inv_scale()
            values += [_norm_or_hold(g, inv_scale) for g in self._grads()]
            rows += 1
        out = [_squared(values, inv_scale).view(rows, -1)] if values else []
        if snapshot is not None:
            out.append(snapshot[None])
        return torch.cat(out) if len(out) > 1 else out[0]

    def accumulated_sq_norms(self) -> torch.Tensor:
        """``[P]`` float64 squared norms of the accumulated ``.grad`` (the big batch), AMP scale removed.

        With a preconditioner ``[2 P]``: the weighted ones follow.

        Raises:
            RuntimeError: if no parameter has a gradient.
        """
        if _no_grads(self.params):
            raise RuntimeError(_NO_GRAD)
        return squared_norms(self._grads(), self._grad_inv_scale())

    def _grads(self) -> list[torch.Tensor | None]:
        """Every ``.grad``, then, with a preconditioner, each weighted by its ``P^{1/2}``."""
        grads = [None if p.grad is None else _local(p.grad) for p in self.params]
        if self.preconditioner is None:
            return grads
        roots = self.preconditioner.roots()
        return grads + [None if g is None else weighted(g, r) for g, r in zip(grads, roots, strict=True)]

    def _grad_inv_scale(self) -> torch.Tensor | None:
        """0-d float32 ``1/s`` for ``.grad``: None unless scaled and not yet unscaled."""
        return None if tc.scaler_unscaled(self.scaler) else tc.scaler_inverse_scale(self.scaler)

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
        self._inv_scale.clear()
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


def _backward_calls_running() -> int:
    """How many ``backward``/``autograd.grad`` calls are in progress, on every thread.

    Counts the frames of the public entry points ``torch.autograd.backward`` (which
    ``Tensor.backward`` calls) and ``torch.autograd.grad``; used only when a graph task
    starts while another one has not finished (nested, or one that raised).
    """
    return tc.backward_calls_running((torch.autograd.backward.__code__, torch.autograd.grad.__code__))


def _no_grads(params: Sequence[nn.Parameter]) -> bool:
    """Whether no parameter has a ``.grad``."""
    return all(p.grad is None for p in params)


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor gradient (FSDP2: squared norms sum over the ranks), else ``grad``."""
    to_local = getattr(grad, "to_local", None)
    return grad if to_local is None else to_local()


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where None is nothing."""
    return b if a is None else a if b is None else a + b
