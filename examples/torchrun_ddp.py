"""The noise scale for free in data-parallel training (CPU, gloo, seconds).

Run: ``torchrun --standalone --nproc_per_node=2 examples/torchrun_ddp.py``
(``python examples/torchrun_ddp.py`` runs the same loop in one process: the same examples, but k = 2
micro-batches instead of W x 2 = 4, so another estimate of the same B_simple: 94 against 83 here).

Each of the W replicas accumulates m = 2 micro-batches under ``no_sync``; the meter
reads the averaged gradient DDP's all-reduce leaves in ``.grad``, and one small
collective every ``sync_every`` (16) steps gathers the W x m micro-batch norms of each
step: the k-way estimator with k = W m. The estimate equals
the one-process ``microbatch`` estimate on the same micro-batches, on every rank.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn

from noisescale import GradientNoiseScale
from noisescale import distributed as nsdist


def main(*, steps: int = 60, batch: int = 128, m: int = 2) -> GradientNoiseScale:
    """Train an MLP on noisy linear data; ``batch`` is the global batch (all replicas)."""
    info = nsdist.init_from_env()  # None unless launched by torchrun with >= 2 processes
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model: nn.Module = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    if info is not None:
        model = nsdist.wrap_ddp(model, info)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    meter = GradientNoiseScale(model, method="microbatch", ema_decay=0.95)  # "ddp" under DDP
    data = torch.Generator().manual_seed(1)  # the same global batches on every rank
    w_true = torch.linspace(-1, 1, 8)
    for _ in range(steps):
        x = torch.randn(batch, 8, generator=data)
        y = x @ w_true + 0.5 * torch.randn(batch, generator=data)
        xr, yr = nsdist.shard_batch(x, y, rank=rank, world_size=world)  # this replica's share
        micro = list(zip(xr.tensor_split(m), yr.tensor_split(m), strict=True))
        for i, (xb, yb) in enumerate(micro):
            with nsdist.grad_sync(model, last=i == m - 1):  # forward AND backward inside no_sync
                loss = nn.functional.mse_loss(model(xb).squeeze(-1), yb)
                (loss / m).backward()
        meter.update(microbatch_sizes=[len(yb) for _, yb in micro])  # this rank's sizes
        opt.step()
        opt.zero_grad(set_to_none=True)
    return meter


if __name__ == "__main__":
    meter = main()
    meter.sync()  # on every rank: exchange the steps since the last exchange (every 16 steps)
    est = meter.compute()  # every rank holds the same estimate
    if nsdist.is_rank_zero():
        b = est.describe("examples")
        print(f"method={meter.method} world_size={meter.world_size}: {b} after {est.steps} steps")
    # Tear down while the interpreter is alive: the meter holds the DDP model, which holds the process group;
    # a group whose gloo threads are still joinable at interpreter exit can abort ("terminate called").
    meter.remove()
    del meter
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
