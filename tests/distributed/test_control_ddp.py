"""BatchSizeController under DDP (2 gloo processes): every rank decides the same, and as one process would.

Both ranks run the controller over the ``ddp`` meter; the single process runs it over the
``microbatch`` meter on the same micro-batches, rank-major. The meter's DDP estimate equals the
single-process one to ~1e-15 relative (tests/distributed/test_ddp.py), so the decisions, made on
the interval with margins of whole integer factors, are the same; ``sync_every = check_every`` so
that each look covers every step so far, as in one process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from noisescale import distributed as nsdist
from noisescale.control.controller import BatchSizeController
from noisescale.control.rules import SGDRule
from noisescale.meter import GradientNoiseScale
from tests.distributed.harness import run_spawned

pytestmark = pytest.mark.distributed
WORLD, MICRO, STEPS, D, SIGMA = 2, 4, 450, 5, 0.7
SETTINGS: dict[str, Any] = {
    "batch_size": 8,
    "micro_batch_size": MICRO,
    "max_batch_size": 256,
    "check_every": 5,
}


def _model() -> torch.nn.Module:
    model = torch.nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(1.0 + torch.tensor([1.0, -1.0, 0.5, 0.8, -0.6], dtype=torch.float64))
    return model


def _microbatches(step: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's global batch in micro-batches of MICRO, rank-major (rank r: the r-th contiguous share)."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(batch, D, generator=g, dtype=torch.float64)
    y = x.sum(1) + SIGMA * torch.randn(batch, generator=g, dtype=torch.float64)  # w* = (1, ..., 1)
    return list(zip(x.split(MICRO), y.split(MICRO), strict=True))


def _train(rank: int | None) -> dict[str, Any]:
    """rank None: one process on every micro-batch; else this rank's share under DDP."""
    model = _model()
    if rank is not None:
        model = nsdist.wrap_ddp(model, nsdist.init_from_env())
    meter = GradientNoiseScale(
        model, method="microbatch" if rank is None else "ddp", ema_decay=0.98, sync_every=5
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.008)
    controller = BatchSizeController(meter, optimizer=opt, rule=SGDRule(), **SETTINGS)
    for step in range(STEPS):
        parts = _microbatches(step, controller.batch_size)
        if rank is not None:
            m = controller.micro_batches
            parts = parts[rank * m : (rank + 1) * m]
        for i, (x, y) in enumerate(parts):
            with nsdist.grad_sync(model, last=i == len(parts) - 1):
                (0.5 * (model(x).squeeze(1) - y).square().mean() / len(parts)).backward()
        meter.update(batch_size=MICRO * len(parts))
        opt.step()
        opt.zero_grad()
        controller.step()
    out = {"schedule": [c.to_dict() for c in controller.schedule], "lr": opt.param_groups[0]["lr"]}
    nsdist.close()
    return out


def worker() -> dict[str, Any]:
    """One rank, spawned by the harness with torchrun's variables set."""
    return _train(int(os.environ["RANK"]))


def test_every_rank_decides_the_same_and_as_one_process(tmp_path: Path) -> None:
    ranks = run_spawned(worker, WORLD, tmp_path)
    single = _train(None)
    assert ranks[0] == ranks[1]  # the same schedule, learning rates bit for bit
    assert len(single["schedule"]) >= 3, single["schedule"]
    assert [c["batch_size"] for c in ranks[0]["schedule"]] == [c["batch_size"] for c in single["schedule"]]
    assert [c["step"] for c in ranks[0]["schedule"]] == [c["step"] for c in single["schedule"]]
    assert ranks[0]["lr"] == pytest.approx(single["lr"], rel=1e-9)
