"""What measuring the noise scale adds to a DDP training step (2 gloo processes, CPU).

Each process holds two identical DDP replicas of an MLP: one trained plainly, one with a
``GradientNoiseScale(method="ddp")`` attached (its per-backward norms, its read of the
all-reduced ``.grad`` and the one asynchronous all-gather per step). Blocks of steps
alternate between them (the order flips every repeat), so drifting machine load hits
both alike; the table reports the median block time per step of each and the ratio of
the medians, plus the median of the per-repeat ratios.

Wall-clock time is what a user pays; on a shared machine it is noisy, so the CPU time
of rank 0's process (compute, including the gloo threads) is reported too.

Run: ``python benchmarks/ddp_overhead.py [--json PATH]`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
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


def _block(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    meter: GradientNoiseScale | None,
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
    plain = DistributedDataParallel(_model(args.model, args.width, args.depth))
    measured = DistributedDataParallel(_model(args.model, args.width, args.depth))
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-3)
    opt_measured = torch.optim.SGD(measured.parameters(), lr=1e-3)
    meter = GradientNoiseScale(measured, method="ddp")
    gen = torch.Generator().manual_seed(rank)
    n = args.steps * args.microbatches
    data = [
        (torch.randn(args.batch, 784, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen))
        for _ in range(n)
    ]
    for _ in range(2):  # warm-up: bucket rebuilds, allocator
        _block(plain, opt_plain, None, data, args.microbatches)
        _block(measured, opt_measured, meter, data, args.microbatches)
    times: dict[str, list[float]] = {"plain": [], "noisescale": []}
    cpu: dict[str, list[float]] = {"plain": [], "noisescale": []}
    for r in range(args.repeats):
        order = [("plain", plain, opt_plain, None), ("noisescale", measured, opt_measured, meter)]
        for name, model, opt, mtr in order if r % 2 == 0 else order[::-1]:
            wall, used = _block(model, opt, mtr, data, args.microbatches)
            times[name].append(wall)
            cpu[name].append(used)
    est = meter.compute()
    if rank == 0:
        torch.save({"times": times, "cpu": cpu, "steps": est.steps}, Path(out) / "times.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="network to train")
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers")
    parser.add_argument("--batch", type=int, default=128, help="examples per micro-batch per process")
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per process and step")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed block")
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
        f"{'clock':<6}{'plain ms/step':>15}{'noisescale ms/step':>20}"
        f"{'ratio of medians':>18}{'median paired':>15}"
    )
    for clock in ("times", "cpu"):
        t = res[clock]
        med = {k: statistics.median(v) for k, v in t.items()}
        paired = statistics.median(b / a for a, b in zip(t["plain"], t["noisescale"], strict=True))
        ratio = med["noisescale"] / med["plain"]
        name = "wall" if clock == "times" else "cpu"
        result[name] = {
            "median_step_s": med,
            "ratio_of_medians": ratio,
            "median_paired_ratio": paired,
            "blocks_s": t,
        }
        print(
            f"{name:<6}{med['plain'] * 1e3:>15.2f}{med['noisescale'] * 1e3:>20.2f}"
            f"{ratio:>18.4f}{paired:>15.4f}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
