"""Fully sharded data parallelism (FSDP2, ``fully_shard``): the noise scale of sharded gradients.

Under ``fully_shard`` every rank holds a shard (a DTensor) of each parameter. In the
forward pass FSDP all-gathers the unsharded parameters the layers use; each backward's
local gradient reaches them first, and FSDP then reduce-scatters it into the sharded
``.grad``: this rank's shard of the mean over the ``W`` ranks (with
``set_requires_gradient_sync(False)``, once, at the step's last backward). That is DDP's
k-way set-up with ``k = W m`` micro-batches (McCandlish et al. 2018, appendix A.1), measured
the same way (:mod:`noisescale.meter.exchange`, the one protocol):

- each backward's local squared norms: tensor hooks on the unsharded parameters
  (:class:`noisescale.collect.GradientRecorder` with ``hooked``), taken before FSDP reduces
  them; under ``per_example`` the layer kernels, which need only each call's input and
  output gradient, are planned while the layers hold the unsharded parameters;
- the big batch: ``|.grad|^2`` of the local shards, a partial sum per rank that travels in
  the same small collective every ``sync_every`` steps as the rows, and is summed there.

Refused, each with what works instead: FSDP1 (``FullyShardedDataParallel``), a 2-D mesh
(HSDP), parameters ``fully_shard`` left unsharded (the root not sharded), DTensors of tensor
parallelism, DeepSpeed ZeRO engines, and a preconditioner.

Shape letters: ``W`` ranks, ``P`` parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from noisescale import _torch_compat as tc
from noisescale.distributed import DistInfo, DistributedSetupError

__all__ = [
    "ShardedModel",
    "check_not_deepspeed",
    "full_state_dict",
    "is_fully_sharded",
    "sharded_model",
    "wrap_fsdp",
]


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` was applied to, outermost first."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or a module inside it."""
    return bool(_fsdp_modules(model))


def check_not_deepspeed(model: object) -> None:
    """Refuse a DeepSpeed engine (ZeRO): its partitioned gradients never pass through the meter's hooks.

    Raises:
        DistributedSetupError: if ``model`` is a ``deepspeed.DeepSpeedEngine``, saying what works.
    """
    if any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__):
        raise DistributedSetupError(
            "a DeepSpeed engine (ZeRO) is not supported: it partitions and reduces gradients in its own "
            "buffers, out of reach of the meter's hooks, so any number would be wrong. Measure the same "
            "model under torch's own data parallelism: fully_shard (FSDP2, method='fsdp'), "
            "DistributedDataParallel (method='ddp'), or one process with method='microbatch'; the noise "
            "scale does not depend on how the gradient is sharded."
        )


def _check_params(model: nn.Module, sharded: bool) -> None:
    """Every parameter sharded by ``fully_shard`` along one 1-D mesh, or none a DTensor.

    Raises:
        DistributedSetupError: naming the first parameter that breaks it, and the fix.
    """
    from torch.distributed.tensor import DTensor, Shard

    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            if sharded and p.requires_grad:
                raise DistributedSetupError(
                    f"parameter {name!r} is not sharded by fully_shard, so no rank reduces its gradient: "
                    "apply fully_shard to the root module too (after its submodules)."
                )
            continue
        if not sharded:
            raise DistributedSetupError(
                f"parameter {name!r} is a DTensor outside fully_shard (tensor parallelism): its gradients "
                "are not whole on any rank. Measure under fully_shard on a 1-D mesh, "
                "DistributedDataParallel, or in one process with method='microbatch'."
            )
        if p.device_mesh.ndim != 1 or not isinstance(p.placements[0], Shard):
            raise DistributedSetupError(
                f"parameter {name!r} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh: "
                "noisescale measures fully_shard on a 1-D mesh, each rank a shard (FSDP, not HSDP or FSDP "
                "with tensor parallelism). Measure on a 1-D mesh or under DistributedDataParallel."
            )


class ShardedModel:
    """The meter's view of a ``fully_shard`` model: where each backward's gradient lands, and the check.

    Built on every rank (it all-gathers the parameters once, so that FSDP has made the
    unsharded parameters the hooks go on). Duck-types :class:`noisescale.distributed.SyncCounter`
    (``world_size``, ``process_group``, :meth:`pop`, :meth:`check_step`, :meth:`remove`).

    Args:
        model: the user's module, ``fully_shard`` applied to it and maybe to submodules.

    Raises:
        DistributedSetupError: see :func:`sharded_model`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = _fsdp_modules(model)
        _check_params(model, sharded=True)
        mesh = next(p for p in model.parameters() if p.requires_grad).device_mesh  # type: ignore[attr-defined]
        self.process_group: dist.ProcessGroup = mesh.get_group()
        self.world_size: int = mesh.size()
        with self.gathered():
            pairs = [pair for m in self.modules for pair in tc.fsdp_parameters(m)]
        self._unsharded = {id(sharded): unsharded for sharded, unsharded in pairs}

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Unshard every module (the layers then hold the unsharded parameters); reshard after.

        A collective (an all-gather per module): on every rank.
        """
        for m in self.modules:
            m.unshard()  # type: ignore[operator]
        try:
            yield
        finally:
            for m in self.modules:
                m.reshard()  # type: ignore[operator]

    def unsharded(self, params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
        """The unsharded parameter each backward fills, for each sharded one (``P`` in, ``P`` out)."""
        return [self._unsharded[id(p)] for p in params]

    def cleared(self, params: Sequence[nn.Parameter]) -> bool:
        """Whether every gradient is gone: no sharded ``.grad`` and no unreduced local one (``zero_grad``)."""
        return all(p.grad is None for p in params) and not any(tc.fsdp_unreduced(m) for m in self.modules)

    def pop(self) -> int:
        """Nothing counted between steps (:meth:`check_step` reads FSDP's state instead)."""
        return 0

    def check_step(self, backward_passes: int) -> None:
        """At :meth:`~noisescale.meter.GradientNoiseScale.update`: the step's gradient is reduced.

        Args:
            backward_passes: the step's backward passes on this rank.

        Raises:
            DistributedSetupError: if the last backward ran without gradient sync, so part of
                the step's gradient is still unreduced on each rank and ``.grad`` lacks it.
        """
        if any(tc.fsdp_unreduced(m) for m in self.modules):
            raise DistributedSetupError(
                f"the last of this step's {backward_passes} backward passes ran with "
                "set_requires_gradient_sync(False): its local gradient is not reduced into .grad yet. Turn "
                "the sync back on (model.set_requires_gradient_sync(True), or "
                "noisescale.distributed.grad_sync(model, last=True)) before the step's last backward."
            )

    def remove(self) -> None:
        """Nothing to detach (the hooks belong to the recorder)."""


def sharded_model(model: nn.Module) -> ShardedModel | None:
    """The :class:`ShardedModel` of a ``fully_shard`` model, None for a plain one; refuse the rest.

    Raises:
        DistributedSetupError: FSDP1, a DeepSpeed engine, a DTensor parameter outside
            ``fully_shard``, a 2-D mesh, or a parameter ``fully_shard`` left unsharded.
    """
    check_not_deepspeed(model)
    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise DistributedSetupError(
                f"module {name or '<root>'!r} is wrapped in FSDP1 (FullyShardedDataParallel), whose flat "
                "parameters hide each backward's gradient: shard it with FSDP2 instead "
                "(torch.distributed.fsdp.fully_shard, measured with method='fsdp'), or use "
                "DistributedDataParallel."
            )
    if not is_fully_sharded(model):
        if dist.is_available():
            _check_params(model, sharded=False)
        return None
    return ShardedModel(model)


def wrap_fsdp(model: nn.Module, info: DistInfo | None) -> nn.Module:
    """Move ``model`` to the rank's device and ``fully_shard`` each child with parameters, then the root.

    Args:
        model: the module (the same initial weights on every rank).
        info: from :func:`noisescale.distributed.init_from_env`.

    Returns:
        ``model`` itself, now an FSDP2 module.

    Raises:
        DistributedSetupError: if ``info`` is None (not launched with several processes).
    """
    if info is None or not (dist.is_available() and dist.is_initialized()):
        raise DistributedSetupError(
            "fully_shard needs an initialised process group and there is none: launch with "
            "`torchrun --nproc_per_node=N` (N >= 2), or measure in one process with method='microbatch'."
        )
    from torch.distributed.fsdp import fully_shard

    model = model.to(info.device)
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a ``fully_shard`` model, whole (a collective: on every rank).

    For rank 0 to load into an unsharded copy of the model and evaluate it alone.
    """
    from torch.distributed.tensor import DTensor

    return {
        key: value.full_tensor() if isinstance(value, DTensor) else value
        for key, value in model.state_dict().items()
    }
