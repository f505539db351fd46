"""Data-parallel training: the noise scale for free, and the torchrun plumbing around it.

In data-parallel training every replica already holds a small-batch gradient and the
all-reduce produces the big one (McCandlish et al. 2018, appendix A.1). With ``W``
replicas that each accumulate ``m`` micro-batches under ``no_sync``, the k-way
estimator runs over ``k = W m`` micro-batches:

- each backward's local gradient norms are recorded before accumulation (and so before
  any all-reduce) by :class:`noisescale.collect.GradientRecorder`;
- :class:`NoiseScaleCommHook`, a DDP communication hook wrapping the all-reduce,
  records the squared norms of the global gradient after it (the bucket is divided by
  the world size first, as DDP's default hook does) and counts how many backward passes
  were synchronised, which exposes a forward pass left outside ``no_sync``;
- at ``update()`` ONE small asynchronous collective per step gathers the ``[m, G + 2]``
  local rows (norms, sizes, loss factors) of every rank (:func:`gather_rows`), or
  all-reduces ``[G + 3]`` per-example sums (:func:`reduce_sums`); every rank then folds
  in the same numbers, so rank 0's estimate is every rank's.

DDP averages the replicas with equal weights whatever their sizes, so with uneven final
batches the big batch is the equal-weight mean and its effective size follows
:func:`noisescale.estimators.effective_batch_size`.

No hook synchronises with the host: norms stay on the device and are fused per bucket.

The helpers :func:`init_from_env`, :func:`wrap_ddp`, :func:`shard_batch`,
:func:`grad_sync` and :func:`is_rank_zero` are what a script (or the CLI) needs to run
under ``torchrun``.

Shape letters: ``W`` replicas, ``m`` micro-batches per replica and step, ``G`` parameter
groups.

References:
    McCandlish, Kaplan, Amodei (2018), An Empirical Model of Large-Batch Training,
    arXiv:1812.06162, appendix A.1 (k-way form over data-parallel replicas).
    k-diffusion ``gns.py`` (Crowson): a comm hook recording norms around the all-reduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from noisescale.collect import _amp_scale, squared_norms
from noisescale.errors import NoiseScaleError

__all__ = [
    "DistInfo",
    "DistributedSetupError",
    "NoiseScaleCommHook",
    "check_supported_parallelism",
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

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


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
    """Leave the process group, if one was joined (each rank, after its last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Move ``model`` to the replica's device and wrap it in DistributedDataParallel.

    Args:
        model: the module to replicate (same initial weights on every rank: DDP
            broadcasts rank 0's anyway).
        info: from :func:`init_from_env`.
        **ddp_kwargs: passed on to ``DistributedDataParallel``.

    Returns:
        The wrapped model.
    """
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
    forward time whether the following backward all-reduces.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> with grad_sync(model, last=False):
        ...     model(torch.ones(1, 2)).sum().backward()
    """
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel wrapper (else ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def check_supported_parallelism(model: nn.Module) -> None:
    """Refuse sharded models (FSDP, tensor parallelism) instead of measuring them wrongly.

    FSDP's ``fully_shard`` runs on CPU with gloo in this torch version, but its
    parameters are sharded DTensors: each backward's gradient goes to transient
    unsharded parameters and then through a reduce-scatter, so the per-micro-batch hooks
    would see nothing and ``.grad`` holds one shard. Rather than a silently different
    number, this raises.

    Raises:
        DistributedSetupError: if any module is FSDP-wrapped or any parameter is a DTensor.
    """
    from torch.distributed.tensor import DTensor

    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "FullyShardedDataParallel" or "FSDP" in kind:
            raise DistributedSetupError(
                f"module {name or '<root>'!r} is sharded with FSDP ({kind}): noisescale measures "
                "data-parallel models wrapped in torch.nn.parallel.DistributedDataParallel. Measure "
                "the noise scale on a DDP run of the model (it does not depend on the parallelism), "
                "or on one process with method='microbatch'."
            )
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            raise DistributedSetupError(
                f"parameter {name!r} is a sharded DTensor (tensor or fully sharded parallelism): "
                "its gradients are not whole on any rank. Use DistributedDataParallel to measure."
            )


# -- the communication hook ----------------------------------------------------------------------
def _allreduce_mean(
    process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's default reduction: divide the bucket by the world size, then all-reduce (sum)."""
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(process_group))
    work = dist.all_reduce(buffer, group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _comm_hook(state: NoiseScaleCommHook, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Count the sync, run the (wrapped) all-reduce, keep the bucket whose norms :meth:`pop` takes.

    The default all-reduce works in place, so the bucket buffer holds the averaged gradient
    once the backward is over: its norms are taken then, in :meth:`NoiseScaleCommHook.pop`,
    not in a callback on the communication thread (a Python callback there contends for the
    GIL with the backward). A wrapped hook may return another tensor: that one is kept, from
    a callback.
    """
    fut = (
        _allreduce_mean(state.process_group, bucket)
        if state.inner is None
        else state.inner[1](state.inner[0], bucket)
    )
    if not state.active:
        return fut
    if bucket.index() == 0:  # bucket 0 opens every synchronised backward
        state._syncs += 1
        state._parts.clear()  # keep only the latest synchronisation of the step
        scale = _amp_scale(state.scaler)  # the buffers hold loss-scaled gradients (AMP)
        state._scale = None if scale is None else scale.detach().clone()
    index, numels = state._layout(bucket.parameters())
    if state.inner is None:
        state._parts.append((index, numels, bucket.buffer()))
        return fut

    def keep(done: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        value = done.value()
        flat = value[0] if isinstance(value, list) else value
        state._parts.append((index, numels, flat))  # list.append is atomic
        return flat

    return fut.then(keep)


# DDP checks a hook's annotations by identity; `from __future__ import annotations` made them strings.
_comm_hook.__annotations__ = {
    "state": object,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


class NoiseScaleCommHook:
    """DDP communication hook: the all-reduce, plus the global squared norms per group after it.

    Registered with ``ddp_model.register_comm_hook`` at construction (DDP allows one
    hook per model; to keep your own, e.g. a compression hook, pass it as ``inner`` and
    this one wraps it). Per bucket it launches the all-reduce (by default: divide by the
    world size, sum, as DDP's built-in reduction does) and keeps the bucket; :meth:`pop`
    sums the squared norms of the averaged gradients into their groups: one fused
    ``torch._foreach_norm`` per bucket, on the device, no host synchronisation. The norms
    are those of the gradient DDP produced, before any clipping of ``.grad`` (with the
    default ``gradient_as_bucket_view=False``).

    Every call on bucket 0 starts a synchronised backward; :meth:`pop` reports how many
    there were since the last call. One per optimiser step is right; more means the
    forward pass of a non-final micro-step ran outside ``no_sync`` (DDP decides at
    forward time, so a ``no_sync`` around the backward only does nothing).

    Args:
        model: the DistributedDataParallel model.
        group_of: ``id(parameter) -> group column`` for the measured parameters; the
            others are all-reduced but not recorded.
        n_groups: G.
        scaler: the GradScaler scaling the loss, if any (its scale is divided out).
        inner: ``(state, hook)`` of a communication hook to wrap instead of the plain
            all-reduce. It must leave the averaged gradient (divided by the world size).

    Raises:
        DistributedSetupError: if the model already has a communication hook.
    """

    def __init__(
        self,
        model: DistributedDataParallel,
        group_of: Mapping[int, int],
        n_groups: int,
        *,
        scaler: torch.amp.GradScaler | None = None,
        inner: tuple[Any, CommHook] | None = None,
    ) -> None:
        self.process_group = model.process_group
        self.world_size = dist.get_world_size(self.process_group)
        self.group_of = dict(group_of)
        self.n_groups = n_groups
        self.scaler = scaler
        self.inner = inner
        self._device = next(model.parameters()).device
        self.active = True  # False once the meter is removed: then only the all-reduce runs
        self._syncs = 0
        self._parts: list[tuple[torch.Tensor, list[int], torch.Tensor]] = []
        self._scale: torch.Tensor | None = None
        self._layouts: dict[tuple[int, ...], tuple[torch.Tensor, list[int]]] = {}
        try:
            model.register_comm_hook(self, _comm_hook)
        except RuntimeError as exc:
            raise DistributedSetupError(
                f"could not register noisescale's DDP communication hook ({exc}). DDP takes one hook: "
                "pass yours to GradientNoiseScale(..., comm_hook=(state, hook)) and noisescale wraps it."
            ) from None

    def _layout(self, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Group column (``n_groups`` = not measured) and length of each parameter of a bucket."""
        key = tuple(id(p) for p in params)
        cached = self._layouts.get(key)
        if cached is None:
            index = torch.tensor(
                [self.group_of.get(id(p), self.n_groups) for p in params], device=self._device
            )
            cached = self._layouts[key] = (index, [p.numel() for p in params])
        return cached

    def pop(self) -> tuple[torch.Tensor | None, int]:
        """Global squared norms of the last synchronisation and the number of syncs since the last pop.

        Returns:
            ``(sq_norms, syncs)``: ``[G]`` float64 squared norms of the all-reduced
            (averaged, loss-scale removed) gradient per group, or None when no
            all-reduce ran; and how many backward passes were synchronised.
        """
        parts, syncs = self._parts, self._syncs
        self._parts, self._syncs = [], 0
        if not parts:
            return None, syncs
        out = torch.zeros(self.n_groups + 1, dtype=torch.float64, device=self._device)
        for index, numels, flat in parts:
            out.index_add_(0, index, squared_norms(flat.split(numels)))
        if self._scale is not None:
            out = out / self._scale.to(torch.float64).square()
        return out[: self.n_groups], syncs


# -- the one collective per step -----------------------------------------------------------------
def gather_rows(
    rows: torch.Tensor, process_group: dist.ProcessGroup | None = None
) -> tuple[Any, list[torch.Tensor]]:
    """Start an all-gather of every rank's ``[m, C]`` rows (asynchronous).

    Args:
        rows: this rank's rows; every rank must pass the same shape (the same number of
            backward passes per step, which every DDP loop has; sizes may differ).
        process_group: the DDP model's group (default: the world).

    Returns:
        ``(work, outputs)``: wait on ``work``, then ``torch.cat(outputs)`` is ``[W m, C]``,
        rank-major.
    """
    outputs = [torch.empty_like(rows) for _ in range(dist.get_world_size(process_group))]
    work = dist.all_gather(outputs, rows.contiguous(), group=process_group, async_op=True)
    return work, outputs


def reduce_sums(sums: torch.Tensor, process_group: dist.ProcessGroup | None = None) -> Any:
    """Start an in-place all-reduce (sum) of additive statistics; wait on the returned work."""
    return dist.all_reduce(sums, group=process_group, async_op=True)
