"""The DDP scenarios' loops under fully_shard (FSDP2) on 2 gloo processes, and FSDP's misuses.

The model is :func:`scenarios.make_model` with ``fully_shard`` on its first layer and on the
root (which then holds the second layer: its ``[1, 5]`` weight and ``[1]`` bias leave rank 1
an empty shard). Each rank gets the same micro-batches as under DDP, so the estimate must
equal the one-process one (:func:`scenarios.run_single`).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from noisescale import GradientNoiseScale
from noisescale import distributed as nsdist
from tests.distributed import scenarios

# The DDP scenarios that apply to FSDP2 (no communication hook, no DDP forward rule, no preconditioner),
# and one of its own: the gradient reduce-scattered after every backward instead of accumulated unreduced.
NAMES = [
    "one-microbatch",
    "accumulation",
    "grad-scaler",
    "uneven-final-batch",
    "sum-reduction",
    "sum-accumulation",
    "example-mean",
    "varying-accumulation",
    "param-groups",
    "clip-before-update",
    "per-example",
    "per-example-accumulation",
    "per-example-example-mean",
]
SCENARIOS: dict[str, dict[str, Any]] = {name: scenarios.SCENARIOS[name] for name in NAMES}
SCENARIOS["sync-every-backward"] = {"batch": 24, "m": 3, "mode": "always_sync", "sync_every": 4}
SCENARIOS["per-example-sync-every-backward"] = {
    "batch": 18,
    "m": 2,
    "method": "per_example",
    "mode": "always_sync",
}


def sharded(model: nn.Module | None = None, *, root: bool = True) -> nn.Module:
    model = scenarios.make_model() if model is None else model
    fully_shard(model[0])
    if root:
        fully_shard(model)
    return model


def run_single(name: str) -> dict[str, Any]:
    return scenarios.train(SCENARIOS[name], scenarios.make_model(), list(range(scenarios.WORLD)))


def _last_backward_unsynced(rank: int) -> str:
    model = sharded()
    meter = GradientNoiseScale(model, method="fsdp")
    model.set_requires_gradient_sync(False)
    for xb, yb in scenarios.microbatches(0, 16, [rank], 2):
        (0.5 * (model(xb).squeeze(-1) - yb).square().mean() / 2).backward()
    model.set_requires_gradient_sync(True)
    return scenarios._expect_error(lambda: meter.update(16))


def _hybrid_sharded() -> nn.Module:
    """HSDP on a (replicate 1, shard 2) mesh: the parameters' placements are 2-D."""
    mesh = init_device_mesh("cpu", (1, scenarios.WORLD), mesh_dim_names=("replicate", "shard"))
    model = scenarios.make_model()
    fully_shard(model, mesh=mesh)
    return model


def _refused(make: Any) -> str:
    try:
        make()
    except (ValueError, nsdist.DistributedSetupError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def worker() -> dict[str, Any]:
    info = nsdist.init_from_env()
    assert info is not None and info.world_size == scenarios.WORLD and info.backend == "gloo"
    out: dict[str, Any] = {}
    for name, spec in SCENARIOS.items():
        out[name] = scenarios.train(spec, sharded(), [info.rank])
    out["last-backward-unsynced"] = _last_backward_unsynced(info.rank)
    out["root-not-sharded"] = _refused(lambda: GradientNoiseScale(sharded(root=False), method="microbatch"))
    out["ddp-method"] = _refused(lambda: GradientNoiseScale(sharded(), method="ddp"))
    out["preconditioner"] = _refused(
        lambda: GradientNoiseScale(sharded(), method="microbatch", preconditioner={})
    )
    out["hsdp"] = _refused(lambda: GradientNoiseScale(_hybrid_sharded(), method="microbatch"))
    plain = scenarios.make_model()
    out["fsdp-method-one-process"] = _refused(lambda: GradientNoiseScale(plain, method="fsdp"))
    dist.barrier()
    dist.destroy_process_group()
    return out
