"""Refuse a parameter whose gradient comes partly from outside the hooked layer calls.

The per-example kernels see a parameter only through the forward calls of the
layers that own it: what reaches a call's outputs, carried by the call's own graph
down to the parameter. Anything else that adds into ``.grad`` makes |G|^2 and
tr(Sigma) silently wrong: a use elsewhere, such as a tied language-model head written
``logits = h @ emb.weight.T`` while ``emb`` also embeds the tokens (also under
``torch.autocast``, where both uses share autocast's cached cast copy of the weight),
or a backward through a graph that a ``create_graph=True`` backward built through the
layer (an input-gradient penalty such as R1 or WGAN-GP reaches the weights through
the tensors the layer saved, e.g. the transposed weight). This module proves, on every
backward pass that adds into ``.grad``, that each parameter's gradient came only
through the hooked calls' graphs from their outputs, and raises otherwise.

How, without a host synchronisation or a tensor comparison:

1. At each hooked layer call, :meth:`UseChecker.watch` walks the autograd graph the
   call built (from its outputs down to its inputs' nodes) and hooks every node on a
   path to a watched parameter's accumulator (its ``AccumulateGrad`` node): the
   call's *chain*. Chain nodes below the outputs' own nodes are *inner* ones (the
   transposed weight of a linear layer, autocast's cast of a weight).
2. In backward, a chain node's post-hook records what it sends along each edge into
   an inner node or an accumulator. The first hooked edge into a receiver is its
   *only* expected arrival; further hooked edges into it (a layer called twice, ties
   through modules, calls sharing autocast's cast) hand their gradients to the
   checker instead of to autograd (the post-hook sends None), and the receiver's hook
   adds them back: an inner node's pre-hook, a parameter's tensor hook.
3. A receiver gets what autograd summed over every edge into it. For an inner node
   (its post-hook) and an accumulator (the parameter's tensor hook) that must be the
   recorded tensor itself (identity, no comparison): any other edge would have made
   autograd add into a new tensor or into that edge's one.

Anything else, a gradient with no hooked edge or a different tensor, is a use the
kernels did not see: :class:`~noisescale.errors.UnsupportedLayerError`, naming the
parameter and the fix. What reaches the outputs' own nodes is not checked: the
kernels see it. Backward passes that do not add into ``.grad``
(``torch.autograd.grad``, with or without ``create_graph``) are not checked, and
cost a few no-op hook calls.

Each chain node is hooked once per checker, however many walks reach it (its
:class:`_Chain` lives in the node's ``metadata``): under autocast, every call of a
layer in one autocast region goes through the same cast node.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from noisescale import _torch_compat as tc
from noisescale.errors import UnsupportedLayerError

__all__ = ["UseChecker"]

_MAX_WALK = 10_000  # nodes one layer call's graph walk may visit (a kernel layer's has a few)


_Record = Tensor | list[Tensor]
"""The hooked edges' gradients into one accumulator or one input of a chain node, in one backward:
the first edge's tensor (what autograd hands on if every edge is a hooked one), or, once a second
hooked edge delivered, a list of it and the held-back ones (the receiver's hook adds them)."""


def _first(record: _Record | None) -> Tensor | None:
    """The first hooked edge's tensor of a record."""
    return record[0] if isinstance(record, list) else record


class _Chain:
    """What the checker keeps for one hooked chain node, in its ``metadata`` (walks through it share it).

    Holds only nodes below it (its accumulators), never its own node or those above:
    the node holds this object, and a cycle through autograd's C++ graph is never freed.
    """

    __slots__ = ("accs", "fed", "inner", "multi", "sends")

    def __init__(self, inner: bool) -> None:
        self.inner = inner  # below the call's outputs: what it receives must come from hooked edges only
        self.accs: list[Any] = []  # the watched accumulators it leads to
        self.sends: list[tuple[int, Any, Sequence[Any]]] = []  # (out slot, record key, accumulators behind)
        self.fed: dict[int, tuple[_Chain, int]] | None = None  # input fed by hooked edges -> record key
        self.multi: set[int] | None = None  # inputs fed by several hooked edges (its pre-hook sums them)


def _adds(accs: Sequence[Any]) -> bool:
    """Whether the running backward adds into the ``.grad`` of one of the parameters behind ``accs``."""
    return any(tc.will_execute(acc) for acc in accs)


def _message(labels: Sequence[str], graph: bool) -> str:
    names = ", ".join(f"'{label}'" for label in labels)
    what = f"parameter {names}" if len(labels) == 1 else f"parameters {names}"
    if graph:
        return (
            f"per_example: {what} gets part of its gradient through a graph that a backward with "
            "create_graph=True built through its layer (a penalty on input gradients such as R1 or WGAN-GP, "
            "`torch.autograd.grad(D(x).sum(), x, create_graph=True)` then `(loss + penalty).backward()`, "
            "reaches the weights through the double-backward graph), or from a use outside the layer that "
            "owns it: the per-example kernels see only what reaches the layer's outputs, so |G|^2 and "
            "tr(Sigma) would be wrong. Fix: use method='microbatch', which needs no per-example kernels."
        )
    return (
        f"per_example: {what} gets part of its gradient from a use outside the layer that "
        "owns it (e.g. a tied head written `h @ emb.weight.T`, or `F.linear(x, layer.weight)`, also under "
        "torch.autocast): the per-example kernels see only the layer's own calls, so |G|^2 and tr(Sigma) "
        "would be wrong. Fix: tie through a module (`head = nn.Linear(d, vocab, bias=False); "
        "head.weight = emb.weight`, then call `head(h)`), or use method='microbatch', which needs no "
        "per-example kernels."
    )


class UseChecker:
    """Per backward, checks that the hooked layer calls are the only uses of the watched parameters.

    Args:
        labels: ``{id(param): name}`` for every parameter to watch (the name is used in
            the error message, e.g. ``'emb.weight'``).
        params: the parameters themselves, each once; each gets one tensor hook.

    Raises:
        UnsupportedLayerError: from ``backward()``, when a watched parameter's gradient
            did not come only through the hooked calls (:func:`_message`).
    """

    def __init__(self, labels: dict[int, str], params: Iterable[nn.Parameter]) -> None:
        self._labels = labels
        self._arrivals: dict[int, dict[Any, _Record]] = {}  # graph task -> record key -> record
        self._unchecked: set[int] = set()  # params of a call whose graph was too large to walk
        self._graphs: set[int] = set()  # params a create_graph backward went through (for the message)
        self._removed = False
        self._lock = threading.Lock()  # backward may run hooks on several device threads
        self._handles: list[RemovableHandle] = [
            p.register_hook(partial(self._arrived, id(p))) for p in params
        ]

    def watch(self, outputs: Sequence[Tensor], inputs: Iterable[Any], params: Iterable[nn.Parameter]) -> Any:
        """Hook the nodes on the paths from one layer call's outputs to ``params``' accumulators.

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
        stops = {t.grad_fn for t in inputs if isinstance(t, Tensor)}
        tops = [o.grad_fn for o in outputs]
        accumulator = tc.ACCUMULATE_GRAD
        links: dict[Any, list[tuple[int, Any, int]]] = {}  # node -> its edges within the call
        chains: dict[Any, _Chain | None] = {}  # node -> its chain, None if it leads to no accumulator
        todo: list[Any] = [node for node in tops if node is not None]
        found = None
        child: Any  # an AccumulateGrad (has .variable) once type(child) is accumulator
        while todo:
            node = todo[-1]
            mine = links.get(node)
            if mine is None:  # first visit: list its edges, then visit the nodes below
                mine = links[node] = []
                for slot, (child, nr) in enumerate(node.next_functions):
                    if type(child) is accumulator:
                        if id(child.variable) in wanted:
                            mine.append((slot, child, nr))
                            found = child
                    elif child is not None and child not in stops:
                        mine.append((slot, child, nr))
                        if child not in links:
                            todo.append(child)
                if len(links) > _MAX_WALK:
                    self._unchecked |= wanted
                    return found
                continue
            todo.pop()  # every node below it is done
            if node not in chains:
                chains[node] = self._link(node, node not in tops, mine, chains) if mine else None
        return found

    def _link(self, node: Any, inner: bool, edges: list[tuple[int, Any, int]], chains: dict[Any, Any]) -> Any:
        """Hook ``node`` (once per checker) if an edge leads to a watched accumulator; link those edges.

        Returns:
            The node's :class:`_Chain`, or None if it leads to none.
        """
        chain: _Chain | None = None
        linked: set[int] | None = None  # slots an earlier walk through this node linked
        for slot, child, nr in edges:
            target: _Chain | None = None
            if type(child) is not tc.ACCUMULATE_GRAD:
                target = chains.get(child)
                if target is None:
                    continue
            if chain is None:
                meta = node.metadata
                chain = meta.get(self)
                if chain is None:
                    chain = meta[self] = _Chain(inner)
                    node.register_hook(partial(self._passed, chain))
                else:  # an earlier walk went through this node (autocast's cast of a weight, shared by calls)
                    chain.inner = chain.inner and inner
                    linked = {sent[0] for sent in chain.sends}
            if linked is not None and slot in linked:
                continue
            if target is None:
                chain.sends.append((slot, id(child.variable), (child,)))
                if child not in chain.accs:
                    chain.accs.append(child)
                continue
            chain.sends.append((slot, self._feed(child, target, nr), target.accs))
            chain.accs += [acc for acc in target.accs if acc not in chain.accs]
        return chain

    def _feed(self, node: Any, chain: _Chain, nr: int) -> tuple[_Chain, int]:
        """The record key of a hooked edge into input ``nr`` of chain ``node`` (a second edge: a pre-hook)."""
        fed = chain.fed
        if fed is None:
            fed = chain.fed = {}
        key = fed.get(nr)
        if key is None:
            key = fed[nr] = (chain, nr)
        else:  # a second hooked edge into this input: the receiver's pre-hook adds the held-back ones
            if chain.multi is None:
                chain.multi = set()
                node.register_prehook(partial(self._gather, chain))
            chain.multi.add(nr)
        return key

    def _passed(
        self, chain: _Chain, grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]
    ) -> tuple[Tensor | None, ...] | None:
        """Node post-hook of a chain node: check what it received, record what it sends."""
        if self._removed:
            return None
        task = tc.graph_task_id()
        if torch.is_grad_enabled():  # create_graph: a graph through the layer's backward now exists
            self._graphs.update(id(acc.variable) for acc in chain.accs)
        accs = chain.accs
        if len(accs) == 1:
            every = adds = tc.will_execute(accs[0])
        else:
            executed = [tc.will_execute(acc) for acc in accs]
            every, adds = all(executed), any(executed)
        if adds and chain.fed is not None:
            self._check(task, chain, grad_outputs)
        out: list[Tensor | None] | None = None
        for slot, key, behind in chain.sends:
            grad = grad_inputs[slot]
            if grad is None or not (every or _adds(behind)):  # torch.autograd.grad: not checked
                continue
            with self._lock:
                mine = self._arrivals.setdefault(task, {})
                record = mine.get(key)
                if record is None:
                    mine[key] = grad
                    continue
                if type(record) is list:
                    record.append(grad)
                else:
                    mine[key] = [record, grad]  # type: ignore[list-item]
            if out is None:
                out = list(grad_inputs)
            out[slot] = None  # held back: the receiver must see one tensor
        return None if out is None else tuple(out)

    def _check(self, task: int, chain: _Chain, grad_outputs: tuple[Tensor | None, ...]) -> None:
        """What an inner chain node received must be what its hooked edges sent, and nothing else.

        A node that is also one of a call's outputs' own (fed by a hooked edge from another
        output of the call) only drops its records: whatever it receives reaches the kernels.
        """
        fed = chain.fed or {}
        with self._lock:
            mine = self._arrivals.get(task)
            for nr, grad in enumerate(grad_outputs):
                key = fed.get(nr)
                expected = None if key is None or mine is None else _first(mine.pop(key, None))
                if grad is not expected and chain.inner:
                    break
            else:
                return
        raise UnsupportedLayerError(self._refusal(chain.accs))

    def _gather(
        self, chain: _Chain, grad_outputs: tuple[Tensor | None, ...]
    ) -> tuple[Tensor | None, ...] | None:
        """Node pre-hook of a chain node fed by several hooked edges: add the held-back gradients."""
        if self._removed or chain.fed is None or chain.multi is None:
            return None
        task = tc.graph_task_id()
        with self._lock:
            mine = self._arrivals.get(task)
            held = [] if mine is None else [(nr, mine.get(chain.fed[nr])) for nr in chain.multi]
        out: list[Tensor | None] | None = None
        for nr, record in held:
            if type(record) is not list:
                continue  # one hooked edge delivered (or none): nothing held back
            if grad_outputs[nr] is not record[0]:
                raise UnsupportedLayerError(self._refusal(chain.accs))
            total = _plus(record[0], record[1:])
            with self._lock:
                self._arrivals.setdefault(task, {})[chain.fed[nr]] = total  # what the post-hook expects
            if out is None:
                out = list(grad_outputs)
            out[nr] = total
        return None if out is None else tuple(out)

    def _arrived(self, key: int, grad: Tensor) -> Tensor | None:
        """Tensor hook of a watched parameter: what autograd summed over every edge into it."""
        task = tc.graph_task_id()
        with self._lock:
            mine = self._arrivals.get(task)
            record = None if mine is None else mine.pop(key, None)
            if mine is not None and not mine:
                del self._arrivals[task]
        rest = record[1:] if type(record) is list else ()
        if record is not None and grad is _first(record):
            return _plus(grad, rest) if rest else None
        if key in self._unchecked or not tc.current_node_adds_into_grad():
            return _plus(grad, rest) if rest else None
        raise UnsupportedLayerError(_message([self._labels[key]], key in self._graphs))

    def _refusal(self, accs: Sequence[Any]) -> str:
        keys = [id(acc.variable) for acc in accs]
        return _message([self._labels[k] for k in keys], any(k in self._graphs for k in keys))

    def drop(self, keep: int | None = None) -> None:
        """Forget the arrivals of every backward graph task but ``keep``."""
        with self._lock:
            self._arrivals = {t: v for t, v in self._arrivals.items() if t == keep}

    def remove(self) -> None:
        """Remove the parameters' tensor hooks; node hooks (they die with their graphs) now do nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._removed = True
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
