"""The torchrun helpers and the meter's refusals, in one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisescale import GradientNoiseScale
from noisescale import distributed as nsdist


def test_shard_batch_is_contiguous_and_covers_the_batch() -> None:
    x = torch.arange(29)
    parts = [nsdist.shard_batch(x, rank=r, world_size=2)[0] for r in range(2)]
    assert [len(p) for p in parts] == [15, 14]
    assert torch.equal(torch.cat(parts), x)


def test_single_process_is_not_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert nsdist.init_from_env() is None
    assert nsdist.is_rank_zero()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert nsdist.init_from_env() is None


def test_grad_sync_is_a_no_op_without_ddp() -> None:
    model = nn.Linear(2, 1)
    with nsdist.grad_sync(model, last=False):
        model(torch.ones(3, 2)).sum().backward()
    assert model.weight.grad is not None
    assert nsdist.unwrap_model(model) is model


def test_wrap_ddp_without_torchrun_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's DDP snippet run with plain ``python``: init_from_env() is None."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = nsdist.init_from_env()
    with pytest.raises(
        nsdist.DistributedSetupError, match=r"torchrun --nproc_per_node=N .*init_process_group"
    ):
        nsdist.wrap_ddp(nn.Linear(2, 1), info)
    stale = nsdist.DistInfo(0, 0, 2, "gloo", torch.device("cpu"))  # e.g. after close(): no group
    with pytest.raises(nsdist.DistributedSetupError, match="there is none"):
        nsdist.wrap_ddp(nn.Linear(2, 1), stale)


def test_ddp_method_needs_a_ddp_model() -> None:
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        GradientNoiseScale(nn.Linear(2, 1), method="ddp")


def test_fsdp1_and_deepspeed_are_refused_saying_what_works() -> None:
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.zeros(2))

    fsdp1 = Layer()
    fsdp1.__class__ = type("FullyShardedDataParallel", (Layer,), {})
    with pytest.raises(nsdist.DistributedSetupError, match=r"FSDP1 .*fully_shard.*method='fsdp'"):
        GradientNoiseScale(nn.Sequential(fsdp1), method="microbatch")
    engine = Layer()
    engine.__class__ = type("DeepSpeedEngine", (Layer,), {})  # deepspeed's class name, not installed here
    with pytest.raises(nsdist.DistributedSetupError, match=r"DeepSpeed engine \(ZeRO\).*fully_shard \(FSDP2"):
        GradientNoiseScale(engine, method="microbatch")
