"""Exact per-example squared gradient norms, per parameter group, from hooks.

A forward hook on every layer that owns trainable parameters of ``groups`` keeps
that call's input in a closure attached, with ``output.register_hook``, to the
call's output; the closure lets go of it once used (unless backward keeps the
graph), so the input is freed when autograd frees its own copy. When backward
delivers the gradient with respect to that output, the layer's kernel turns
``(input, grad_output)`` into per-example squared norms of the weight and bias
contributions (Goodfellow 2015), kept as ``[N]`` parts that
:meth:`PerExampleNorms.pop` sums per group into the ``[N, G]`` result. Nothing of
parameter size per example is formed on this path; the layer's backward is not
replaced or repeated. Several forward calls before one backward each keep their
own input; row ``n`` then sums what row ``n`` of every call contributed (example
``n`` is the tuple of the calls' ``n``-th rows, e.g. a siamese pair).

Shared parameters (tied weights, a layer called more than once per backward) take
the materialising path: each use's ``[N, *P]`` contribution is summed, and the norm
is taken in :meth:`PerExampleNorms.pop`. Layers without a kernel raise
:class:`~noisescale.errors.UnsupportedLayerError`, or, with ``fallback=True``, use
the exact recompute of :mod:`noisescale.per_example.fallback`. A parameter also used
outside the layers that own it (``h @ emb.weight.T``, also under autocast), or reached
through a double-backward graph (an input-gradient penalty backpropagated with the loss),
makes ``backward()`` raise :class:`~noisescale.errors.UnsupportedLayerError`
(:mod:`noisescale.per_example.uses`).

Which calls count: a layer is "called twice" in a backward when two of its forward
calls are still pending (not yet backpropagated, graph alive) when the backward
reaches it. A call is no longer pending once a backward that frees its graph has
passed through it, including ``torch.autograd.grad`` (an evaluation probe, a
penalty; the kernels do no work there, since nothing reaches ``.grad``), or once its
graph is freed. A forward pass whose graph is alive but not yet backpropagated
costs its own activations only, but makes the backward passes meanwhile take the
materialising path for its layers (exact, more memory): drop such outputs, or run
them under ``torch.no_grad()``.

Scaling: the norms are those of the contributions backward actually computed.
With a mean-reduced loss over ``N`` examples that is ``|g_n|^2 / N^2``; multiply
by ``N^2`` for ``|g_n|^2`` (BackPACK's ``BatchL2Grad`` has the same convention).
Under AMP, divide by the loss scale squared.

Under a diagonal preconditioner ``P`` (:mod:`noisescale.preconditioner`) every example's
weighted squared norm ``sum_j P_j c_nj^2`` is taken too, by the kernels' ``pairs``
(:func:`~noisescale.per_example.kernel.norm_pairs`), by the fallback from the same rows,
and from the summed contributions of shared parameters: the ``G`` weighted columns follow
the ``G`` plain ones. Without one nothing of it runs.

Scaling under AMP: given a GradScaler (:meth:`PerExampleNorms.set_scaler`), the
output gradients are unscaled before any square is taken, so the norms are those of
the unscaled gradients (no under- or overflow at extreme scales).

Limitations: dim 0 of every hooked layer's input must index examples
(``batch_first=True``); ``requires_grad`` is read at construction (build a new
object after freezing or unfreezing); with activation checkpointing the recomputed
forward counts as a pending call too (exact, materialising), and the hooked layers'
inputs are kept alive until backward, which takes back the memory checkpointing would save.

Shape letters: ``N`` examples, ``G`` parameter groups, ``P`` a parameter's shape.

References:
    Goodfellow (2015), Efficient Per-Example Gradient Computations, arXiv:1510.01799.
    Li et al. (2022), Large Language Models Can Be Strong Differentially Private
    Learners, arXiv:2110.05679 (ghost clipping).
    Gray et al. (2023), Efficient and Approximate Per-Example Gradient Norms for
    Gradient Noise Scale, WANT@NeurIPS.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils.hooks import RemovableHandle

from noisescale import _torch_compat as tc
from noisescale.per_example import fallback as fb
from noisescale.per_example.kernel import accumulation_dtype, norm_pairs, weighted_sq_norm
from noisescale.per_example.plan import Unit, build_units
from noisescale.per_example.uses import UseChecker, inputs_of, watched
from noisescale.preconditioner import Preconditioner

__all__ = ["PerExampleNorms"]


class _Frame(NamedTuple):
    """A fallback layer's forward call in progress."""

    unit: Unit
    rng: fb.RngState | None  # None when gradients are disabled (nothing to replay)
    called: set[Unit]  # hooked layers that ran inside this call


class _Call:
    """One pending forward call of a hooked layer: what its backward hook needs.

    Held only by the hook on the call's outputs, so it lives exactly as long as the
    call's graph; while alive and not yet backpropagated through a graph-freeing
    backward it is in its unit's ``pending`` set (a WeakSet).
    """

    __slots__ = ("__weakref__", "acc", "saved", "unit")

    def __init__(self, unit: Unit, saved: Any, acc: Any) -> None:
        self.unit = unit
        self.saved: list[Any] = [saved]  # the layer input (kernels) or SavedCall (fallback)
        self.acc = acc  # an accumulator node the call reaches: does a backward add into .grad?
        unit.pending.add(self)

    def take(self) -> Any:
        """The saved item, released (and the call no longer pending) unless the backward keeps the graph.

        Held to the end of backward, layer inputs would cost memory, and time in the
        allocations that could not reuse it.

        Raises:
            RuntimeError: on a second backward through a graph that was not kept.
        """
        if not self.saved:
            raise RuntimeError(
                "per-example norms: backward through this graph a second time, but the first backward "
                "freed it; use .backward(retain_graph=True) the first time."
            )
        if tc.keeps_graph():
            return self.saved[0]
        self.unit.pending.discard(self)
        return self.saved.pop()


def _param(unit: Unit, key: int) -> nn.Parameter:
    """The parameter of ``unit`` with ``id`` ``key``."""
    return next(p for p in unit.params.values() if id(p) == key)


def _total(values: list[Tensor]) -> Tensor:
    """Sum of ``[N]`` tensors in at most two operations."""
    return values[0] if len(values) == 1 else torch.stack(values).sum(0)


class PerExampleNorms:
    """Per-example squared gradient norms, per parameter group, of each backward pass.

    Args:
        model: the network; its layers get forward hooks.
        groups: G groups of ``model``'s parameters; parameters with
            ``requires_grad=False`` are ignored.
        fallback: compute layers without a kernel (BatchNorm, MultiheadAttention,
            custom layers with their own parameters...) by the exact but slower
            recompute of :mod:`noisescale.per_example.fallback`, instead of raising.
        preconditioner: also the ``P``-weighted squared norms, in ``G`` more columns; it
            must weigh every trainable parameter of ``groups``.

    Raises:
        UnsupportedLayerError: a layer owning trainable group parameters has no
            kernel and ``fallback`` is False; the message names the layers and fixes.
        ValueError: a trainable group parameter is not in ``model`` or is in two groups.
        TypeError: ``model`` is not an ``nn.Module`` or a group holds a non-tensor.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> pe = PerExampleNorms(model, [list(model.parameters())])
        >>> model(torch.randn(5, 3)).square().mean().backward()
        >>> pe.pop().shape
        torch.Size([5, 1])
        >>> pe.pop() is None
        True
        >>> pe.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[Sequence[nn.Parameter]],
        *,
        fallback: bool = False,
        preconditioner: Preconditioner | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be an nn.Module but got {type(model).__name__}.")
        tc.check()
        self._units, self._num_groups = build_units(model, [list(g) for g in groups], fallback=fallback)
        self._preconditioner = preconditioner
        self._columns = self._num_groups * (1 if preconditioner is None else 2)
        self._uses = UseChecker(*watched(self._units))
        self._inv_scale: tuple[int, Tensor | None] = (-1, None)  # (graph task, 1/s) cache
        self._scaler: torch.amp.GradScaler | None = None
        self._shared_in: dict[int, dict[Unit, bool]] = {}  # graph task -> unit -> called twice in it
        # Per backward graph task: (layer, column, [N] squared norms) parts (fast path), and
        # id(param) -> (layer, column, [N, *P] per-example gradient sum) (shared parameters).
        self._parts: dict[int, list[tuple[Unit, int, Tensor]]] = {}
        self._grads: dict[int, dict[int, tuple[Unit, int, Tensor]]] = {}
        self._frames: list[_Frame] = []  # fallback calls in progress, innermost last
        self._suspended = 0  # > 0 while a fallback recomputes: hooks stay silent
        self._lock = threading.Lock()  # backward may run hooks on several device threads
        self._handles: list[RemovableHandle] = []
        for unit in self._units:
            self._hook(unit)

    def set_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Unscale the output gradients by ``scaler``'s scale before taking norms.

        The norms are then those of the unscaled gradients whatever the scale: the
        squares of scaled ones underflow float32 at ``2**-70`` and overflow it at
        ``2**64``. :class:`noisescale.collect.GradientRecorder` sets it.
        """
        self._scaler = scaler

    def pop(self, task: int | None = None) -> Tensor | None:
        """The ``[N, G]`` squared norms of one backward pass, or of all since the last call.

        Call it at the end of each backward with its graph task id
        (:func:`noisescale._torch_compat.graph_task_id`; :class:`noisescale.collect.GradientRecorder`
        does, from its end-of-backward callback); a backward that raised halfway then
        leaves its parts under its own task, which the next ``pop()`` without a task drops.
        Entry ``[n, j]`` is the squared L2 norm of example ``n``'s
        contribution to the gradient this backward added to group ``j``
        (``|g_n|^2 / N^2`` with a mean-reduced loss); with a preconditioner, entry
        ``[n, G + j]`` its weighted squared norm. Columns of groups that got
        nothing are zero.

        Returns:
            ``[N, G]`` (``[N, 2 G]``) tensor (float32 at least, on the gradients' device), or None if
            no hooked layer received a gradient.

        Raises:
            RuntimeError: if layers saw different numbers of examples in dim 0.
        """
        with self._lock:
            tasks = list(self._parts.keys() | self._grads.keys()) if task is None else [task]
            parts: list[tuple[Unit, int, Tensor]] = []
            grads: dict[int, tuple[Unit, int, Tensor]] = {}
            for t in tasks:
                parts += self._parts.pop(t, [])
                for key, (unit, column, g) in self._grads.pop(t, {}).items():
                    previous = grads.get(key)
                    grads[key] = (unit, column, g if previous is None else previous[2] + g)
            if task is None:
                self._shared_in.clear()
            else:
                self._shared_in.pop(task, None)
        parts += [(unit, column, g.flatten(1).square().sum(1)) for unit, column, g in grads.values()]
        if self._preconditioner is not None:
            weight = self._preconditioner.weight
            parts += [
                (unit, self._num_groups + column, weighted_sq_norm(g, weight(_param(unit, key))))
                for key, (unit, column, g) in grads.items()
            ]
        return self._to_columns(parts) if parts else None

    def drop(self, keep: int | None = None) -> None:
        """Forget the norms of every backward graph task but ``keep`` (the one running)."""
        with self._lock:
            self._parts = {t: v for t, v in self._parts.items() if t == keep}
            self._grads = {t: v for t, v in self._grads.items() if t == keep}
            self._shared_in = {t: v for t, v in self._shared_in.items() if t == keep}
        self._uses.drop(keep)

    def remove(self) -> None:
        """Remove all hooks and drop any pending norms."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._uses.remove()
        self._parts, self._grads, self._shared_in = {}, {}, {}

    # -- hooks -------------------------------------------------------------------------------

    def _hook(self, unit: Unit) -> None:
        module = unit.module
        if unit.kernel is not None:
            self._handles.append(
                module.register_forward_hook(partial(self._after_kernel_forward, unit), with_kwargs=True)
            )
            return
        self._handles.append(
            module.register_forward_pre_hook(partial(self._before_fallback_forward, unit), with_kwargs=True)
        )
        self._handles.append(
            module.register_forward_hook(
                partial(self._after_fallback_forward, unit), with_kwargs=True, always_call=True
            )
        )

    def _after_kernel_forward(
        self, unit: Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if self._suspended or not torch.is_grad_enabled():
            return
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        x = args[0] if args else next(iter(kwargs.values()))
        if x.dim() < unit.min_dim:
            raise ValueError(
                f"'{unit.path}' ({type(module).__name__}) got an input of shape {list(x.shape)}: "
                f"per-example norms need a batch dimension first (at least {unit.min_dim} dims)."
            )
        for frame in self._frames:
            frame.called.add(unit)
        acc = self._uses.watch([output], inputs_of(args, kwargs), unit.params.values())
        if acc is not None:  # else no gradient of its parameters flows through this call
            output.register_hook(partial(self._kernel_backward, _Call(unit, x, acc)))

    def _kernel_backward(self, call: _Call, go: Tensor) -> None:
        twice = self._called_twice(call.unit)  # decided while this call is still pending: take() ends that
        x = call.take()
        if not tc.will_execute(call.acc):  # torch.autograd.grad (a probe, a penalty): nothing reaches .grad
            return
        if torch.is_grad_enabled():  # backward(create_graph=True): the norms need no graph
            with torch.no_grad():
                self._run_kernel(call.unit, x, self._unscaled(go), twice=twice)
        else:
            self._run_kernel(call.unit, x, self._unscaled(go), twice=twice)

    def _called_twice(self, unit: Unit) -> bool:
        """Whether ``unit`` has two or more pending calls as the running backward first reaches it.

        Decided once per unit and backward: the calls this backward consumes stop being
        pending as it goes, but all of them must take the same path.
        """
        task = tc.graph_task_id()
        with self._lock:
            decided = self._shared_in.setdefault(task, {})
            twice = decided.get(unit)
            if twice is None:
                twice = decided[unit] = len(unit.pending) > 1
        return twice

    def _unscaled(self, go: Tensor) -> Tensor:
        """``go`` divided by the AMP loss scale in force (unchanged without a scaler), before any square."""
        task = tc.graph_task_id()
        cached_task, inv = self._inv_scale
        if cached_task != task or inv is None:
            inv = tc.scaler_inverse_scale(self._scaler)
            if inv is None:
                return go
            self._inv_scale = (task, inv)
        return go.to(accumulation_dtype(go.dtype)) * inv

    def _run_kernel(self, unit: Unit, x: Tensor, go: Tensor, *, twice: bool) -> None:
        kernel = unit.kernel
        assert kernel is not None
        norm_names: tuple[str, ...]
        grad_names: tuple[str, ...]
        if twice:  # its uses must be summed before the norm
            norm_names, grad_names = (), unit.direct
        else:
            norm_names, grad_names = unit.norm_names, unit.shared_names
        if norm_names and self._preconditioner is None:
            self._add_norms(unit, kernel.norms(unit.module, x, go, norm_names))
        elif norm_names:
            self._add_norms(
                unit, *norm_pairs(kernel, unit.module, x, go, norm_names, self._weights(unit, norm_names))
            )
        if grad_names:
            self._add_grads(unit, kernel.grads(unit.module, x, go, grad_names))

    def _weights(self, unit: Unit, names: tuple[str, ...]) -> dict[str, Tensor]:
        """The preconditioner's ``{name: [*P]}`` of ``unit``'s parameters ``names``."""
        assert self._preconditioner is not None
        return {name: self._preconditioner.weight(unit.params[name]) for name in names}

    def _before_fallback_forward(
        self, unit: Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._suspended:
            return
        rng = fb.capture_rng(args, kwargs) if torch.is_grad_enabled() else None
        self._frames.append(_Frame(unit, rng, set()))

    def _after_fallback_forward(
        self, unit: Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if self._suspended:
            return
        frame = self._frames.pop()
        outs = fb.output_tensors(output)
        positions = tuple(i for i, o in enumerate(outs) if isinstance(o, Tensor) and o.requires_grad)
        if frame.rng is None or not positions or not torch.is_grad_enabled():
            return
        for outer in self._frames:
            outer.called.add(unit)
        # Inner layers this call did not run (their parameters were used directly) are covered here.
        names = unit.direct + tuple(
            n for inner, inner_names in unit.inner.items() if inner not in frame.called for n in inner_names
        )
        outputs = [outs[i] for i in positions]
        acc = self._uses.watch(outputs, inputs_of(args, kwargs), [unit.params[n] for n in names])
        if acc is None:
            return
        args, kwargs = fb.detach_inputs(args, kwargs)
        call = _Call(unit, fb.SavedCall(args, kwargs, frame.rng, positions, names), acc)
        register_multi_grad_hook(outputs, partial(self._fallback_backward, call))

    def _fallback_backward(self, pending: _Call, grads_out: Sequence[Tensor | None]) -> None:
        unit = pending.unit
        twice = self._called_twice(unit)  # decided while this call is still pending: take() ends that
        call: fb.SavedCall = pending.take()
        if all(g is None for g in grads_out) or not tc.will_execute(pending.acc):
            return
        grads_out = [None if g is None else self._unscaled(g) for g in grads_out]
        norm_names: tuple[str, ...]
        grad_names: tuple[str, ...]
        if twice:
            norm_names, grad_names = (), call.names
        else:
            grad_names = tuple(n for n in call.names if n in unit.shared_names)
            norm_names = tuple(n for n in call.names if n not in grad_names)
        self._suspended += 1
        try:
            if norm_names and self._preconditioner is None:
                self._add_norms(unit, fb.per_example_norms(unit.module, call, grads_out, norm_names))
            elif norm_names:
                weights = self._weights(unit, norm_names)
                self._add_norms(
                    unit, *fb.per_example_norm_pairs(unit.module, call, grads_out, norm_names, weights)
                )
            if grad_names:
                self._add_grads(unit, fb.per_example_grads(unit.module, call, grads_out, grad_names))
        finally:
            self._suspended -= 1

    # -- accumulation ------------------------------------------------------------------------

    def _to_columns(self, parts: list[tuple[Unit, int, Tensor]]) -> Tensor:
        """Sum ``[N]`` parts per column into ``[N, G]`` (zero columns for groups that got none)."""
        first, _, head = parts[0]
        n = head.shape[0]
        columns: list[list[Tensor]] = [[] for _ in range(self._columns)]
        for unit, column, values in parts:
            if values.shape[0] != n:
                raise RuntimeError(
                    f"'{unit.path}' ({type(unit.module).__name__}) saw {values.shape[0]} examples in dim 0 "
                    f"but '{first.path}' ({type(first.module).__name__}) saw {n} in this backward: "
                    "per-example norms need every hooked layer to see the whole batch in dim 0 "
                    "(use batch_first=True layouts)."
                )
            columns[column].append(values)
        if all(columns):
            return torch.stack([_total(c) for c in columns], 1)
        zeros = head.new_zeros(n)
        return torch.stack([_total(c) if c else zeros for c in columns], 1)

    def _add_norms(
        self, unit: Unit, norms: dict[str, Tensor], weighted: dict[str, Tensor] | None = None
    ) -> None:
        """Keep ``{name: [N]}`` squared norms, and the weighted ones in the columns after the plain ones."""
        columns = unit.columns
        task = tc.graph_task_id()
        with self._lock:
            parts = self._parts.setdefault(task, [])
            parts.extend((unit, columns[name], values) for name, values in norms.items())
            if weighted is not None:
                g = self._num_groups
                parts.extend((unit, g + columns[name], values) for name, values in weighted.items())

    def _add_grads(self, unit: Unit, grads: dict[str, Tensor]) -> None:
        task = tc.graph_task_id()
        with self._lock:
            mine = self._grads.setdefault(task, {})
            for name, g in grads.items():
                key = id(unit.params[name])
                previous = mine.get(key)
                if previous is not None and previous[2].shape != g.shape:
                    raise RuntimeError(
                        f"'{unit.path}' ({type(unit.module).__name__}) gave a per-example gradient of "
                        f"shape {list(g.shape)} for '{name}' but another use gave {list(previous[2].shape)}: "
                        "every use of a shared parameter must see the same batch in dim 0."
                    )
                mine[key] = (unit, unit.columns[name], g if previous is None else previous[2] + g)
