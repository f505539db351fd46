"""What measuring the noise scale adds to a DDP training step (2 gloo processes, CPU).

Each process holds four identical DDP replicas of the network: one trained plainly; one
with a ``GradientNoiseScale(method="ddp")`` attached (its per-backward norms, its read of
the all-reduced ``.grad`` and one asynchronous all-gather every ``sync_every`` = 16
steps); ``every_step``: the same meter with ``sync_every=1`` (an all-gather per step);
and ``reads``: only the two reads of the gradient that the estimate cannot avoid (each
backward's local gradient and the all-reduced ``.grad``, squared-normed and dropped),
the floor of any exact implementation on this machine. Blocks of steps (16 by default,
so that each holds one exchange of the default meter) run in turn, the order rotated
every repeat, so drifting machine load hits all alike; the table reports the median
block time per step of the plain replica, each other's ratio of medians to it, and the
median of the per-repeat ratios of the meter.

Wall-clock time is what a user pays; on a shared machine it is noisy, so the CPU time
of rank 0's process (compute, including the gloo threads) is reported too.

Run: ``python benchmarks/ddp_overhead.py [--json PATH]`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from noisescale import GradientNoiseScale
from noisescale.collect import norm

VARIANTS = ("plain", "reads", "noisescale", "every_step")
COMPARED = VARIANTS[1:]


def _model(kind: str, width: int, depth: int) -> nn.Module:
    """``mlp``: 784-width x depth-10 (few flops per parameter: the hardest case for the meter);
    ``cnn``: two 5x5 convolutions (32, 64 channels) and a linear layer on 28x28 images."""
    torch.manual_seed(0)
    if kind == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
        )  # fmt: skip
    layers: list[nn.Module] = [nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class _ReadsOnly:
    """The reads the DDP estimate cannot avoid, and nothing else: each backward's local
    gradient (a tensor hook, before DDP's all-reduce) and the all-reduced ``.grad`` are
    normed once (:func:`noisescale.collect.norm`), the norms dropped."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:
            p.register_hook(self._read)

    @staticmethod
    def _read(grad: torch.Tensor) -> None:
        norm(grad)

    def update(self, batch_size: int) -> None:
        for p in self.params:
            if p.grad is not None:
                norm(p.grad)


def _block(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    meter: GradientNoiseScale | _ReadsOnly | None,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    m: int,
) -> tuple[float, float]:
    """Wall and CPU seconds per optimizer step over the block (this process, between barriers)."""
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(0, len(data), m):
        micro = data[step : step + m]
        for i, (x, y) in enumerate(micro):
            ctx = model.no_sync() if i < m - 1 else torch.enable_grad()
            with ctx:
                (nn.functional.cross_entropy(model(x), y) / m).backward()
        if meter is not None:
            meter.update(batch_size=sum(len(y) for _, y in micro))
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    dist.barrier()
    steps = len(data) // m
    return wall / steps, cpu / steps


def _worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    replicas = {
        name: DistributedDataParallel(_model(args.model, args.width, args.depth)) for name in VARIANTS
    }
    opts = {name: torch.optim.SGD(model.parameters(), lr=1e-3) for name, model in replicas.items()}
    meter = GradientNoiseScale(replicas["noisescale"], method="ddp")
    meters = {
        "plain": None,
        "reads": _ReadsOnly(replicas["reads"]),
        "noisescale": meter,
        "every_step": GradientNoiseScale(replicas["every_step"], method="ddp", sync_every=1),
    }
    gen = torch.Generator().manual_seed(rank)
    n = args.steps * args.microbatches
    data = [
        (torch.randn(args.batch, 784, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen))
        for _ in range(n)
    ]
    for _ in range(2):  # warm-up: bucket rebuilds, allocator
        for name in VARIANTS:
            _block(replicas[name], opts[name], meters[name], data, args.microbatches)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.repeats):
        for name in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:  # order rotated
            wall, used = _block(replicas[name], opts[name], meters[name], data, args.microbatches)
            times[name].append(wall)
            cpu[name].append(used)
    meter.sync()  # every rank
    est = meter.compute()
    if rank == 0:
        torch.save({"times": times, "cpu": cpu, "steps": est.steps}, Path(out) / "times.pt")
    # Wait for every meter's collective in flight (remove() does; `every_step` always has one) and drop the
    # replicas before the group: gloo work still pending at interpreter exit aborts the process.
    for m in meters.values():
        if isinstance(m, GradientNoiseScale):
            m.remove()
    meters.clear()
    replicas.clear()
    gc.collect()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="network to train")
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers")
    parser.add_argument("--batch", type=int, default=128, help="examples per micro-batch per process")
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per process and step")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per timed block")
    parser.add_argument("--repeats", type=int, default=30, help="timed blocks per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, port, tmp), nprocs=2, join=True)
        res: dict[str, Any] = torch.load(Path(tmp) / "times.pt")
    result: dict[str, Any] = {
        "config": vars(args)
        | {"json": str(args.json) if args.json else None, "processes": 2, "backend": "gloo"},
        "threads_available": os.cpu_count(),
    }
    print(
        f"DDP step, 2 gloo processes, {args.model} (MLP 784-{args.width}x{args.depth}-10 or CNN 32-64), "
        f"{args.batch} x {args.microbatches} examples per process, "
        f"{args.repeats} repeats x {args.steps} steps"
    )
    print(
        f"{'clock':<6}{'plain ms/step':>15}{'reads ratio':>13}{'noisescale ratio':>18}{'median paired':>15}"
        f"{'every_step ratio':>18}"
    )
    for clock in ("times", "cpu"):
        t = res[clock]
        med = {k: statistics.median(v) for k, v in t.items()}
        paired = statistics.median(b / a for a, b in zip(t["plain"], t["noisescale"], strict=True))
        ratio = {k: med[k] / med["plain"] for k in COMPARED}
        name = "wall" if clock == "times" else "cpu"
        result[name] = {
            "median_step_s": med,
            "ratio_of_medians": ratio["noisescale"],
            "reads_ratio_of_medians": ratio["reads"],
            "every_step_ratio_of_medians": ratio["every_step"],
            "median_paired_ratio": paired,
            "blocks_s": t,
        }
        print(
            f"{name:<6}{med['plain'] * 1e3:>15.2f}{ratio['reads']:>13.4f}"
            f"{ratio['noisescale']:>18.4f}{paired:>15.4f}{ratio['every_step']:>18.4f}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
