"""Data-parallel training: the noise scale for free, and the torchrun plumbing around it.

In data-parallel training every replica already holds a small-batch gradient and the
all-reduce produces the big one (McCandlish et al. 2018, appendix A.1). With ``W``
replicas that each accumulate ``m`` micro-batches under ``no_sync``, the k-way
estimator runs over ``k = W m`` micro-batches:

- each backward's local gradient norms are recorded before accumulation (and so before
  any all-reduce) by :class:`noisescale.collect.GradientRecorder`;
- the global gradient is the one DDP's own all-reduce leaves in ``.grad`` (the mean
  over replicas), read once per step as in one process; :class:`SyncCounter` counts
  the backward passes that synchronised, which exposes a forward pass left outside
  ``no_sync``. No communication hook: a Python one in place of DDP's built-in C++
  reduction cost 10% of a small model's step;
- every ``sync_every`` steps (and at ``meter.sync()``) ONE small asynchronous collective
  gathers the ``[m, G + 2]`` local rows (norms, sizes, loss factors) of each of those
  steps from every rank (:func:`gather_rows`), or all-reduces their ``[G + 3]``
  per-example sums (:func:`reduce_sums`); every rank then folds in the same numbers, so
  rank 0's estimate is every rank's. One collective per step cost 3-6% of a DDP step on
  CPU (a small gloo collective is about 0.1 ms to start and 0.8 ms of work).

DDP averages the replicas with equal weights whatever their sizes, so with uneven final
batches the big batch is the equal-weight mean and its effective size follows
:func:`noisescale.estimators.effective_batch_size`.

No hook synchronises with the host: norms stay on the device.

The helpers :func:`init_from_env`, :func:`wrap_ddp`, :func:`shard_batch`,
:func:`grad_sync` and :func:`is_rank_zero` are what a script (or the CLI) needs to run
under ``torchrun``.

Shape letters: ``W`` replicas, ``m`` micro-batches per replica and step, ``G`` parameter
groups.

References:
    McCandlish, Kaplan, Amodei (2018), An Empirical Model of Large-Batch Training,
    arXiv:1812.06162, appendix A.1 (k-way form over data-parallel replicas).
    k-diffusion ``gns.py`` (Crowson) records norms around the all-reduce in a comm hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from noisescale.errors import NoiseScaleError

__all__ = [
    "DistInfo",
    "DistributedSetupError",
    "SyncCounter",
    "close",
    "gather_rows",
    "grad_sync",
    "init_from_env",
    "is_rank_zero",
    "reduce_sums",
    "shard_batch",
    "unwrap_model",
    "world_size",
    "wrap_ddp",
]


class DistributedSetupError(NoiseScaleError, RuntimeError):
    """The distributed setup cannot give a trustworthy noise scale; the message says the fix."""


# -- torchrun plumbing ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a data-parallel job.

    Attributes:
        rank: global rank, 0 to ``world_size - 1``.
        local_rank: rank on this machine (selects the GPU).
        world_size: W, the number of replicas.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA).
        device: where this replica's model and batches live.
    """

    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device


def init_from_env(backend: str | None = None, *, timeout_s: float = 600.0) -> DistInfo | None:
    """Join the process group described by torchrun's environment variables.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    (``torchrun --standalone --nproc_per_node=W`` sets them all). Initialises the default
    group once (nccl when CUDA is available, else gloo) and pins the CUDA device.

    Args:
        backend: force a backend instead of choosing one.
        timeout_s: collective timeout, seconds.

    Returns:
        The process's :class:`DistInfo`, or None when not launched with more than one
        process (plain ``python``, or ``torchrun --nproc_per_node=1``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 and not (dist.is_available() and dist.is_initialized()):
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    if not dist.is_initialized():
        chosen = backend or ("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_world_size() < 2:
        return None
    chosen = dist.get_backend()
    device = torch.device("cuda", local_rank) if chosen == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), chosen, device)


def is_rank_zero() -> bool:
    """True in a single process, or on rank 0 of an initialised group: the one that writes."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    """W of the initialised default group, or 1 in a single process."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def close() -> None:
    """Leave the process group, if one was joined: every rank waits for the others, then all leave.

    Call it on every rank after its last collective. The ranks meet at a barrier (the ranks
    that only train wait there while rank 0 writes); then the garbage a run leaves in
    reference cycles (a DDP wrapper and its reducer, the meter's finished collectives, all
    holding the group) is collected while the interpreter is fully alive, and only then is
    the group destroyed. Without these two steps a rank aborted at exit now and then
    ("terminate called without an active exception", SIGABRT) in two-node launches on
    127.0.0.1: gloo objects released during the interpreter's shutdown are the suspected
    cause (PyTorch's discussion of the same abort: pytorch/pytorch#179291).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo | None, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Move ``model`` to the replica's device and wrap it in DistributedDataParallel.

    Args:
        model: the module to replicate (same initial weights on every rank: DDP
            broadcasts rank 0's anyway).
        info: from :func:`init_from_env`.
        **ddp_kwargs: passed on to ``DistributedDataParallel``.

    Returns:
        The wrapped model.

    Raises:
        DistributedSetupError: if ``info`` is None (:func:`init_from_env` found no
            launcher) or no process group is initialised.
    """
    if info is None or not (dist.is_available() and dist.is_initialized()):
        raise DistributedSetupError(
            "wrap_ddp needs an initialised process group and there is none (init_from_env() returns "
            "None when a script is not launched with several processes). Launch it with "
            "`torchrun --nproc_per_node=N script.py` (N >= 2) or call "
            "torch.distributed.init_process_group first; in one process, skip wrap_ddp and "
            "measure with method='microbatch'."
        )
    model = model.to(info.device)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


def shard_batch(*tensors: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous slice of a global batch (dim 0), as ``tensor_split`` cuts it.

    Cutting the global batch into ``W`` contiguous parts, then each part into ``m``
    micro-batches, gives rank ``r`` the global micro-batches ``r m`` to ``r m + m - 1``:
    the same split a single process would make with ``k = W m`` micro-batches. Sizes may
    differ by one (an uneven final batch).

    Args:
        *tensors: ``[B, *]`` tensors of the global batch (same ``B``).
        rank: this replica's rank.
        world_size: W.

    Returns:
        One ``[B_r, *]`` slice per input tensor.

    Example:
        >>> [t.tolist() for t in shard_batch(torch.arange(5), rank=1, world_size=2)]
        [[3, 4]]
    """
    return tuple(t.tensor_split(world_size)[rank] for t in tensors)


def grad_sync(model: nn.Module, *, last: bool) -> contextlib.AbstractContextManager[Any]:
    """``model.no_sync()`` on every micro-step but the last, for DDP models; else a no-op.

    Put BOTH the forward and the backward of the micro-step inside it: DDP decides at
    forward time whether the following backward all-reduces. For a ``fully_shard``
    (FSDP2) model, ``set_requires_gradient_sync(False)`` inside it and ``True`` again after:
    the step's earlier backward passes accumulate unreduced, the last one reduce-scatters.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> with grad_sync(model, last=False):
        ...     model(torch.ones(1, 2)).sum().backward()
    """
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync") and not last:  # FSDP2's FSDPModule
        return _without_gradient_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _without_gradient_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel wrapper (else ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# -- synchronised backward passes ----------------------------------------------------------------
class SyncCounter:
    """Counts the synchronised forward passes of a DDP model: each one's backward all-reduces.

    DDP decides at forward time whether the next backward all-reduces (grad enabled and
    not inside ``no_sync``), so a forward hook on the DDP module counts the backward
    passes that synchronise. One per optimiser step is right; more means the forward of
    a non-final micro-step ran outside ``no_sync`` (a ``no_sync`` around the backward
    only does nothing); none means ``.grad`` holds this rank's gradient only.

    The meter reads the big batch from ``.grad``, where DDP leaves the all-reduced mean
    with its own built-in (C++) reduction; noisescale registers no communication hook,
    so your own (e.g. compression) stays yours to register.

    Args:
        model: the DistributedDataParallel model.
    """

    def __init__(self, model: DistributedDataParallel) -> None:
        self.process_group = model.process_group
        self.world_size = dist.get_world_size(self.process_group)
        self._syncs = 0
        self._handle = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.is_grad_enabled() and module.require_backward_grad_sync:
            self._syncs += 1

    def pop(self) -> int:
        """Synchronised forward passes since the last call."""
        syncs, self._syncs = self._syncs, 0
        return syncs

    def check_step(self, backward_passes: int) -> None:
        """At the end of an optimizer step: raise if no all-reduce ran, warn if more than one did.

        Args:
            backward_passes: the step's backward passes on this rank (for the warning).

        Raises:
            DistributedSetupError: if every micro-step ran inside ``no_sync``.
        """
        syncs = self.pop()
        if not syncs:
            raise DistributedSetupError(
                "no DDP gradient all-reduce ran since the last update(): every micro-step was "
                "inside model.no_sync(), so .grad holds this rank's gradient only. Run the last "
                "micro-step of each optimizer step outside no_sync()."
            )
        if syncs > 1:
            warnings.warn(
                f"DDP all-reduced the gradients in {syncs} of the {backward_passes} backward passes of "
                "this step: the forward pass of a non-final micro-step ran outside model.no_sync() "
                "(DDP decides at forward time), so each micro-step paid a full all-reduce (or a "
                "forward ran without a backward). The noise scale is still right (noisescale records "
                "each backward's own gradient), but put the forward AND the backward inside "
                "`with model.no_sync():`.",
                stacklevel=4,
            )

    def remove(self) -> None:
        """Stop counting."""
        self._handle.remove()


# -- the meter's one collective every few steps ---------------------------------------------------
def gather_rows(
    rows: torch.Tensor, process_group: dist.ProcessGroup | None = None
) -> tuple[Any, list[torch.Tensor]]:
    """Start an all-gather of every rank's ``[M, C]`` rows (asynchronous).

    Args:
        rows: this rank's rows; every rank must pass the same shape (the same number of
            steps and of backward passes per step, which every DDP loop has; sizes may
            differ).
        process_group: the DDP model's group (default: the world).

    Returns:
        ``(work, outputs)``: wait on ``work``, then ``outputs[r]`` is rank ``r``'s ``[M, C]``.
    """
    outputs = [torch.empty_like(rows) for _ in range(dist.get_world_size(process_group))]
    work = dist.all_gather(outputs, rows.contiguous(), group=process_group, async_op=True)
    return work, outputs


def reduce_sums(sums: torch.Tensor, process_group: dist.ProcessGroup | None = None) -> Any:
    """Start an in-place all-reduce (sum) of additive statistics; wait on the returned work."""
    return dist.all_reduce(sums, group=process_group, async_op=True)
