"""Refuse a parameter whose gradient comes partly from outside the hooked layer calls.

The per-example kernels see a parameter only through the forward calls of the
layers that own it. A use elsewhere, such as a tied language-model head written
``logits = h @ emb.weight.T`` while ``emb`` also embeds the tokens, adds a term to
``.grad`` that no kernel saw: |G|^2 and tr(Sigma) would be silently wrong. This
module proves, on every backward pass that adds into ``.grad``, that the gradient
reaching each parameter's accumulator (its ``AccumulateGrad`` node) is exactly what
the hooked calls sent along their own edges into it, and raises otherwise.

How, without a host synchronisation or a tensor comparison:

1. At each hooked layer call, :meth:`UseChecker.watch` walks the autograd graph the
   call built (from its outputs down to its inputs' nodes) and puts a post-hook on
   every node with an edge into a watched parameter's accumulator.
2. In backward, the first such hooked edge to deliver a gradient for a parameter is
   recorded as that parameter's *only* expected arrival; further hooked edges (a
   layer called twice, ties through modules) hand their gradients to the checker
   instead of to autograd (the post-hook sends None along that edge).
3. The parameter's own tensor hook then receives what autograd summed over all the
   edges into the accumulator. If that is the recorded tensor itself (identity, no
   comparison), every edge was a hooked one; any other edge would have made autograd
   add into a new tensor or into the other edge's one. The hook returns the recorded
   tensor plus the held ones, which is what autograd would have accumulated.

Anything else, a gradient with no hooked edge or a different tensor, is a use the
kernels did not see: :class:`~noisescale.errors.UnsupportedLayerError`, naming the
parameter and the fix. Backward passes that do not add into ``.grad``
(``torch.autograd.grad``) are not checked.

Limitation: under ``torch.autocast`` a parameter cast once and cached by autocast is
one edge into its accumulator whatever uses the cast copy; an outside use of that
cached copy is not detected.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from noisescale import _torch_compat as tc
from noisescale.errors import UnsupportedLayerError

__all__ = ["UseChecker"]

_MAX_WALK = 10_000  # nodes one layer call's graph walk may visit (a kernel layer's has a few)


class _Arrival(NamedTuple):
    """The hooked edges' gradients for one parameter in one backward."""

    first: Tensor  # the tensor autograd accumulates, if every edge is a hooked one
    rest: list[Tensor]  # further hooked edges' gradients, held back and added in the tensor hook


def _message(label: str) -> str:
    return (
        f"per_example: parameter '{label}' gets part of its gradient from a use outside the layer that "
        "owns it (e.g. a tied head written `h @ emb.weight.T`, or `F.linear(x, layer.weight)`): the "
        "per-example kernels see only the layer's own calls, so |G|^2 and tr(Sigma) would be wrong. "
        "Fix: tie through a module (`head = nn.Linear(d, vocab, bias=False); head.weight = emb.weight`, "
        "then call `head(h)`), or use method='microbatch', which needs no per-example kernels."
    )


class UseChecker:
    """Per backward, checks that the hooked layer calls are the only uses of the watched parameters.

    Args:
        labels: ``{id(param): name}`` for every parameter to watch (the name is used in
            the error message, e.g. ``'emb.weight'``).
        params: the parameters themselves, each once; each gets one tensor hook.

    Raises:
        UnsupportedLayerError: from ``backward()``, when a watched parameter's gradient
            did not come only from the hooked calls (:func:`_message`).
    """

    def __init__(self, labels: dict[int, str], params: Iterable[nn.Parameter]) -> None:
        self._labels = labels
        self._arrivals: dict[int, dict[int, _Arrival]] = {}  # graph task -> id(param) -> arrival
        self._unchecked: set[int] = set()  # params of a call whose graph was too large to walk
        self._lock = threading.Lock()  # backward may run hooks on several device threads
        self._handles: list[RemovableHandle] = [
            p.register_hook(partial(self._arrived, id(p))) for p in params
        ]

    def watch(self, outputs: Sequence[Tensor], inputs: Iterable[Any], params: Iterable[nn.Parameter]) -> Any:
        """Hook the edges into ``params``' accumulators from the graph one layer call built.

        Args:
            outputs: the call's outputs that require grad.
            inputs: the call's inputs (positional and keyword values); the walk stops at
                their autograd nodes, so only the call's own graph is searched.
            params: the parameters this call accounts for.

        Returns:
            The accumulator node of one of ``params`` that the call reaches (for
            :func:`~noisescale._torch_compat.will_execute`), or None if it reaches none
            (no gradient of ``params`` flows through this call).
        """
        wanted = {id(p) for p in params if p.requires_grad}
        stops = {t.grad_fn for t in inputs if isinstance(t, Tensor)}  # None among them is harmless
        todo = [o.grad_fn for o in outputs]
        seen: set[Any] = set()
        accumulator = tc.ACCUMULATE_GRAD
        found = None
        child: Any  # an AccumulateGrad (has .variable) once type(child) is accumulator
        while todo:
            node = todo.pop()
            if node is None:
                continue
            slots: list[tuple[int, int, Any]] = []
            for slot, (child, _) in enumerate(node.next_functions):
                if type(child) is accumulator:
                    key = id(child.variable)
                    if key in wanted:
                        slots.append((slot, key, child))
                        found = child
                elif child is not None and child not in seen and child not in stops:
                    seen.add(child)
                    todo.append(child)
            if slots:
                node.register_hook(partial(self._sent, tuple(slots)))
            if len(seen) > _MAX_WALK:
                self._unchecked |= wanted
                break
        return found

    def _sent(
        self, slots: tuple[tuple[int, int, Any], ...], grad_inputs: tuple[Tensor | None, ...], _: Any
    ) -> tuple[Tensor | None, ...] | None:
        """Node post-hook: what a hooked call's node sends along its edges into accumulators."""
        task = tc.graph_task_id()
        out: list[Tensor | None] | None = None
        for slot, key, acc in slots:
            grad = grad_inputs[slot] if out is None else out[slot]
            if grad is None or not tc.will_execute(acc):  # torch.autograd.grad: not checked
                continue
            with self._lock:
                mine = self._arrivals.setdefault(task, {})
                arrival = mine.get(key)
                if arrival is None:
                    mine[key] = _Arrival(grad, [])
                    continue
                if arrival.first is grad or any(g is grad for g in arrival.rest):
                    continue  # the same edge hooked twice (a node two walks reached)
                arrival.rest.append(grad)
            if out is None:
                out = list(grad_inputs)
            out[slot] = None  # held back: the accumulator must see one tensor
        return None if out is None else tuple(out)

    def _arrived(self, key: int, grad: Tensor) -> Tensor | None:
        """Tensor hook of a watched parameter: what autograd summed over every edge into it."""
        task = tc.graph_task_id()
        with self._lock:
            mine = self._arrivals.get(task)
            arrival = None if mine is None else mine.pop(key, None)
            if mine is not None and not mine:
                del self._arrivals[task]
        if arrival is not None and grad is arrival.first:
            return _plus(grad, arrival.rest) if arrival.rest else None
        if key in self._unchecked or not tc.current_node_adds_into_grad():
            return None if arrival is None else _plus(grad, arrival.rest)
        raise UnsupportedLayerError(_message(self._labels[key]))

    def drop(self, keep: int | None = None) -> None:
        """Forget the arrivals of every backward graph task but ``keep``."""
        with self._lock:
            self._arrivals = {t: v for t, v in self._arrivals.items() if t == keep}

    def remove(self) -> None:
        """Remove the parameters' tensor hooks (node hooks die with their graphs)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._arrivals = {}


def _plus(grad: Tensor, rest: Sequence[Tensor]) -> Tensor:
    """``grad`` plus the held-back gradients, out of place (autograd may still use ``grad``)."""
    total = grad
    for g in rest:
        total = total + g
    return total


def watched(units: Iterable[Any]) -> tuple[dict[int, str], list[nn.Parameter]]:
    """``({id(param): 'layer.name'}, params)`` for the parameters the units account for directly."""
    labels: dict[int, str] = {}
    params: list[nn.Parameter] = []
    for unit in units:
        for name in unit.direct:
            p = unit.params[name]
            if id(p) not in labels:
                labels[id(p)] = f"{unit.path}.{name}" if unit.path else name
                params.append(p)
    return labels, params


def inputs_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The positional and keyword values of a call (tensors among them stop the walk)."""
    return [*args, *kwargs.values()]
