"""Which data parallelism the meter measures over: one process, DDP, or FSDP2.

Under both DDP (:mod:`noisescale.distributed`) and ``fully_shard`` (:mod:`noisescale.fsdp`)
the replicas' backward passes are the small batches and the reduced gradient is the big one,
exchanged by the one protocol of :mod:`noisescale.meter.exchange`. What differs is where the
hooks go (FSDP2: the unsharded parameters), how a step's reduction is checked
(:class:`~noisescale.distributed.SyncCounter`, :class:`~noisescale.fsdp.ShardedModel`), and
that FSDP2's ``.grad`` is a shard whose squared norms are summed over the ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from noisescale import distributed as nsdist
from noisescale import fsdp
from noisescale.options import Method

__all__ = ["DataParallel", "data_parallel"]


class DataParallel(NamedTuple):
    """The meter's data parallelism.

    Attributes:
        method: the method after resolution (``microbatch`` becomes ``ddp`` or ``fsdp``).
        module: the user's module (unwrapped from DDP).
        replicas: the step check of DDP or FSDP2 (``world_size``, ``process_group``,
            ``pop``, ``check_step``, ``remove``), or None in one process.
        sharded: the FSDP2 view, or None.
    """

    method: Method
    module: nn.Module
    replicas: nsdist.SyncCounter | fsdp.ShardedModel | None
    sharded: fsdp.ShardedModel | None

    @property
    def world_size(self) -> int:
        """W, 1 in one process."""
        return 1 if self.replicas is None else self.replicas.world_size

    def hooked(self, params: Sequence[nn.Parameter]) -> list[nn.Parameter] | None:
        """The tensors each backward's gradient reaches, when not ``params`` themselves (FSDP2)."""
        return None if self.sharded is None else self.sharded.unsharded(params)

    def layers_gathered(self) -> contextlib.AbstractContextManager[Any]:
        """Around planning the per-example kernels: the layers hold the unsharded parameters (FSDP2)."""
        return contextlib.nullcontext() if self.sharded is None else self.sharded.gathered()


def data_parallel(model: nn.Module, method: Method, *, preconditioned: bool = False) -> DataParallel:
    """Tell one process, DDP and FSDP2 apart, resolve the method, refuse what cannot be measured.

    Args:
        model: what the user passed to the meter.
        method: the method asked for; ``microbatch`` on a DDP (FSDP2) model is ``ddp`` (``fsdp``).
        preconditioned: a preconditioner was asked for.

    Raises:
        ValueError: ``ddp`` without a DistributedDataParallel model, ``fsdp`` without a
            ``fully_shard`` one, or a preconditioner under FSDP2.
        noisescale.distributed.DistributedSetupError: FSDP1, DeepSpeed, HSDP, tensor
            parallelism, a root ``fully_shard`` left out (:func:`noisescale.fsdp.sharded_model`).
    """
    fsdp.check_not_deepspeed(model)
    module = nsdist.unwrap_model(model)
    ddp = model if isinstance(model, DistributedDataParallel) else None
    sharded = fsdp.sharded_model(module)
    if method == "microbatch":
        method = "ddp" if ddp is not None else "fsdp" if sharded is not None else method
    if method == "ddp" and ddp is None:
        raise ValueError(
            "method='ddp' measures a DistributedDataParallel model: wrap the model first "
            "(noisescale.distributed.wrap_ddp), or use method='microbatch' in one process"
        )
    if method == "fsdp" and sharded is None:
        raise ValueError(
            "method='fsdp' measures a fully_shard (FSDP2) model: shard it first "
            "(noisescale.fsdp.wrap_fsdp), or use method='microbatch' in one process"
        )
    if sharded is not None and preconditioned:
        raise ValueError(
            "a preconditioner under fully_shard (FSDP2) is not supported: measure the preconditioned "
            "noise scale under DistributedDataParallel or in one process (it does not depend on sharding)"
        )
    replicas = nsdist.SyncCounter(ddp) if ddp is not None else sharded
    return DataParallel(method, module, replicas, sharded)
