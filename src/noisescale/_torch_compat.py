"""Every private PyTorch (and CPython) API noisescale relies on, in one place.

The meter's hooks need a few things PyTorch does not (yet) expose publicly: which
backward call is running, whether it adds into ``.grad``, a callback at its end, the
GradScaler's scale without a host synchronisation, a fused norm kernel, and a few
more. Each is wrapped here in a small typed function that says why it is needed, so
that a PyTorch upgrade that moves one breaks one module, and :func:`check` (run once
by the meter's constructor, and by ``tests/test_torch_compat.py``) says which API is
gone, by name, instead of an ``AttributeError`` deep inside a backward hook.

Importing this module never fails; :func:`check` raises
:class:`~noisescale.errors.UnsupportedTorchError` naming every API that is missing or
behaves differently (last verified on torch 2.13).
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable, Sequence
from types import CodeType, FrameType
from typing import Any

import torch
from torch import Tensor, nn

from noisescale.errors import UnsupportedTorchError

__all__ = [
    "ACCUMULATE_GRAD",
    "REQUIRED_APIS",
    "accumulated_variable",
    "backward_calls_running",
    "check",
    "conv_padding",
    "current_node_adds_into_grad",
    "foreach_norm",
    "fsdp_parameters",
    "fsdp_unreduced",
    "graph_task_id",
    "keeps_graph",
    "queue_callback",
    "scaler_inverse_scale",
    "scaler_scale",
    "scaler_unscaled",
    "will_execute",
]

REQUIRED_APIS: tuple[str, ...] = (
    "torch._C._current_graph_task_id",
    "torch._C._will_engine_execute_node",
    "torch._C._current_autograd_node",
    "torch._C._autograd._get_current_graph_task_keep_graph",
    "torch.autograd.Variable._execution_engine.queue_callback",
    "torch._C._functions.AccumulateGrad.variable",
    "torch._foreach_norm",
    "torch.amp.GradScaler._scale",
    "torch.amp.GradScaler._per_optimizer_states",
    "torch.amp.grad_scaler.OptState.UNSCALED",
    "torch.nn.Conv2d._reversed_padding_repeated_twice",
    "sys._current_frames",
)
"""Dotted names of the private APIs used; :func:`check` verifies each one exists."""


def graph_task_id() -> int:
    """Id of the backward call (autograd graph task) running on this thread, -1 outside one.

    Needed to tell apart the gradients of several backward calls (micro-batches, a
    nested reentrant-checkpoint backward, a ``torch.autograd.grad`` probe) that reach
    the same hooks. Ids only grow within a process.
    """
    return torch._C._current_graph_task_id()


def will_execute(node: Any) -> bool:
    """Whether the running backward call will run autograd ``node``.

    For an ``AccumulateGrad`` node (a parameter's gradient accumulator): True in
    ``backward()`` (also with ``inputs=``, for the parameters it names), False inside
    ``torch.autograd.grad``, which returns gradients without touching ``.grad`` (there
    autograd refuses to answer for a leaf, which reads as False). Used so that only the
    backward calls that add into ``.grad`` are recorded.
    """
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # "A leaf node was passed ... while running autograd.grad()"
        return False


def current_node_adds_into_grad() -> bool:
    """From a parameter's tensor hook: whether this backward adds its gradient into ``.grad``.

    In a leaf's tensor hook the node running is the leaf's ``AccumulateGrad`` node; see
    :func:`will_execute`.
    """
    return will_execute(torch._C._current_autograd_node())


def keeps_graph() -> bool:
    """Whether the running backward keeps its graph (``retain_graph``/``create_graph``).

    A layer call's saved input is released once its gradient hook has run unless the
    graph is kept, in which case a second backward through it needs the input again.
    """
    return bool(torch._C._autograd._get_current_graph_task_keep_graph())


def queue_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` at the end of the running backward call, after those queued before it.

    Files a backward's record once all its gradient hooks have run, without any
    tensor operation (there is no public end-of-backward hook).
    """
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def _accumulate_grad_type() -> type[Any]:
    """The accumulator node type, or a type no node has if this torch builds graphs differently."""
    try:
        leaf = torch.zeros(1, requires_grad=True)
        return type(leaf.view(1).grad_fn.next_functions[0][0])  # type: ignore[union-attr]
    except Exception:  # check() names the API; importing must not fail
        return type(None)


ACCUMULATE_GRAD: type[Any] = _accumulate_grad_type()
"""The type of a leaf's gradient accumulator node (``torch._C._functions.AccumulateGrad``).

Its ``.variable`` is the leaf. Walking the graph a layer call built
(:mod:`noisescale.per_example.uses`) finds the edges into a parameter's accumulator
by this type; an exact type check, since the walk is on the forward hot path.
"""


def accumulated_variable(node: Any) -> Tensor | None:
    """The leaf tensor of an ``AccumulateGrad`` node, or None for any other autograd node."""
    return node.variable if type(node) is ACCUMULATE_GRAD else None


def foreach_norm(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """0-d L2 norms of many small tensors in one fused kernel (one launch, not one per tensor).

    ``torch._foreach_norm`` is what ``clip_grad_norm_`` uses; on a model with hundreds
    of small parameters (biases, norm layers) one kernel instead of hundreds is a
    visible part of a step.
    """
    return list(torch._foreach_norm(list(tensors), dtype=dtype))


def scaler_scale(scaler: torch.amp.GradScaler | None) -> Tensor | None:
    """The scaler's current scale as a device tensor, or None when it is not scaling.

    ``GradScaler.get_scale()`` returns a Python float (a host synchronisation on every
    call); the hooks need the device tensor, read without synchronising. GradScaler
    changes it only in ``update()``, between optimiser steps.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler._scale


def scaler_inverse_scale(scaler: torch.amp.GradScaler | None) -> Tensor | None:
    """0-d float32 ``1/s`` of the current scale ``s`` as ``GradScaler.unscale_`` computes it, or None.

    On the device, no host synchronisation: what the hooks multiply gradients by before any square.
    """
    scale = scaler_scale(scaler)
    return None if scale is None else scale.double().reciprocal().float()


def scaler_unscaled(scaler: torch.amp.GradScaler | None) -> bool:
    """True when the user already called ``scaler.unscale_(optimizer)`` this step.

    ``.grad`` is then no longer scaled; there is no public query for it.
    """
    if scaler is None or not scaler.is_enabled():
        return False
    from torch.amp.grad_scaler import OptState

    return any(s["stage"] is OptState.UNSCALED for s in scaler._per_optimizer_states.values())


def conv_padding(module: nn.Conv1d | nn.Conv2d) -> Sequence[int]:
    """The padding ``F.pad`` needs for a convolution with ``padding_mode != 'zeros'``.

    The layer computes it once from ``padding`` (including ``'same'``); recomputing it
    would duplicate PyTorch's rule.
    """
    return module._reversed_padding_repeated_twice


def fsdp_parameters(module: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(sharded, unsharded)`` pairs of the parameters ``fully_shard`` gave ``module`` itself (FSDP2).

    The sharded parameter (a DTensor) is the one the optimizer holds and whose ``.grad``
    receives this rank's shard of the reduced gradient; the unsharded one is what the
    layers use between FSDP's all-gather and reshard, and what each backward's local
    gradient reaches first. FSDP2 creates it at its first all-gather and keeps the same
    object afterwards (it only frees and refills its storage), so call ``module.unshard()``
    first. FSDP2 exposes neither publicly; the meter hooks the unsharded ones.

    Raises:
        noisescale.errors.UnsupportedTorchError: if FSDP2's internals are not where torch
            2.13 keeps them (``FSDPModule._get_fsdp_state()._fsdp_param_groups[i].fsdp_params[j]``
            with ``sharded_param`` and ``_unsharded_param``).
    """
    try:
        groups = module._get_fsdp_state()._fsdp_param_groups  # type: ignore[operator]
        return [(fp.sharded_param, fp._unsharded_param) for g in groups for fp in g.fsdp_params]
    except AttributeError as exc:
        raise UnsupportedTorchError(
            f"noisescale cannot measure a fully_shard (FSDP2) model on torch {torch.__version__}: FSDP2's "
            f"internals moved ({exc}). Last verified on torch 2.13; measure under DistributedDataParallel."
        ) from None


def fsdp_unreduced(module: nn.Module) -> bool:
    """Whether a backward left an unreduced local gradient in ``module``'s unsharded parameters.

    Under ``set_requires_gradient_sync(False)`` FSDP2 keeps each backward's local gradient in
    the unsharded parameter's ``.grad`` (or, with a reduce dtype, in ``unsharded_accumulated_grad``)
    until a backward with the sync on reduce-scatters it into the sharded ``.grad``.
    """
    groups = module._get_fsdp_state()._fsdp_param_groups  # type: ignore[operator]
    return any(
        fp.unsharded_accumulated_grad is not None
        or (hasattr(fp, "_unsharded_param") and fp._unsharded_param.grad is not None)
        for g in groups
        for fp in g.fsdp_params
    )


def _frames() -> list[FrameType]:
    """The innermost frame of every running thread (``sys._current_frames``)."""
    return list(sys._current_frames().values())


def backward_calls_running(codes: Sequence[CodeType]) -> int:
    """How many frames of the functions with ``codes`` are on the stacks of every thread.

    Used with the code of ``torch.autograd.backward`` and ``torch.autograd.grad`` to
    tell a nested backward (reentrant checkpointing) from one that raised halfway; there
    is no autograd API that lists the running graph tasks. Only called in that rare
    situation, never per step.
    """
    count = 0
    for frame in _frames():
        walk: FrameType | None = frame
        while walk is not None:
            count += walk.f_code in codes
            walk = walk.f_back
    return count


def _missing() -> list[str]:
    """The names in :data:`REQUIRED_APIS` that this torch or Python lacks."""
    missing = []
    for name in REQUIRED_APIS:
        root, *parts = name.split(".")
        obj: Any = sys if root == "sys" else torch
        if root == "torch" and parts[:2] == ["amp", "grad_scaler"]:
            obj, parts = importlib.import_module("torch.amp.grad_scaler"), parts[2:]
        elif name.startswith("torch.amp.GradScaler."):
            obj, parts = torch.amp.GradScaler("cpu", enabled=True), parts[2:]
        elif name.startswith("torch.nn.Conv2d."):
            obj, parts = nn.Conv2d(1, 1, 1), parts[2:]
        elif name == "torch._C._functions.AccumulateGrad.variable":
            leaf = torch.zeros(1, requires_grad=True)
            node = leaf.view(1).grad_fn.next_functions[0][0]  # type: ignore[union-attr]
            obj, parts = (node if type(node) is ACCUMULATE_GRAD else None), ["variable"]
        for part in parts:
            if not hasattr(obj, part):
                missing.append(name)
                break
            obj = getattr(obj, part)
    return missing


def _behaviour() -> list[str]:
    """What the APIs do on a tiny backward, compared with what the hooks assume."""
    problems: list[str] = []
    seen: dict[str, Any] = {}
    leaf = torch.ones(2, requires_grad=True)

    def hook(grad: Tensor) -> None:
        seen["task"] = graph_task_id()
        seen["adds"] = current_node_adds_into_grad()
        seen["keep"] = keeps_graph()
        queue_callback(lambda: seen.setdefault("callback", graph_task_id()))

    handle = leaf.register_hook(hook)
    try:
        (leaf * 2).sum().backward()
        backward = dict(seen)
        seen.clear()
        torch.autograd.grad((leaf * 2).sum(), [leaf])
        probe = dict(seen)
    finally:
        handle.remove()
    if not (isinstance(backward.get("task"), int) and backward["task"] >= 0):
        problems.append("torch._C._current_graph_task_id (no id inside a backward)")
    if backward.get("adds") is not True or probe.get("adds") is not False:
        problems.append(
            "torch._C._will_engine_execute_node / torch._C._current_autograd_node "
            "(cannot tell backward() from torch.autograd.grad)"
        )
    if backward.get("keep") is not False:
        problems.append("torch._C._autograd._get_current_graph_task_keep_graph")
    if backward.get("callback") != backward.get("task"):
        problems.append("torch.autograd.Variable._execution_engine.queue_callback (callback did not run)")
    if graph_task_id() != -1:
        problems.append("torch._C._current_graph_task_id (not -1 outside a backward)")
    norms = foreach_norm([torch.full((4,), 1e-30), torch.ones(9)], torch.float64)
    if not (len(norms) == 2 and abs(norms[1].item() - 3.0) < 1e-12 and norms[0].dtype == torch.float64):
        problems.append("torch._foreach_norm (wrong values or dtype)")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # creates the scale tensor lazily, as a training step does
    scale = scaler_scale(scaler)
    if not (isinstance(scale, Tensor) and scale.item() == 4.0):
        problems.append("torch.amp.GradScaler._scale (not the scale tensor)")
    if backward_calls_running((_behaviour.__code__,)) != 1:
        problems.append("sys._current_frames (does not show this thread's stack)")
    return problems


@functools.cache
def check() -> None:
    """Verify that every private API in :data:`REQUIRED_APIS` exists and behaves as assumed.

    Runs once per process (cached): a tiny backward on two-element tensors, well
    under a millisecond. The meter's hooks call it at construction.

    Raises:
        noisescale.errors.UnsupportedTorchError: naming each API that is missing or
            behaves differently on this torch, with the last torch version it was verified on.
    """
    with torch.random.fork_rng(devices=[]):  # the probe must not move the user's random stream
        missing = _missing()
        problems = [f"{name} (missing)" for name in missing] if missing else _behaviour()
    if problems:
        raise UnsupportedTorchError(
            f"noisescale cannot measure gradients on torch {torch.__version__}: it relies on private "
            f"PyTorch APIs that are gone or changed: {'; '.join(problems)}. Install a torch version "
            "noisescale supports (last verified: 2.13) or a noisescale release that supports this one."
        )
