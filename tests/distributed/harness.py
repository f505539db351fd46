"""Run a function on W gloo processes on 127.0.0.1 and collect what each rank returns."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str, args: tuple[Any, ...]) -> None:
    # torchrun's variables, so that the worker joins through noisescale.distributed.init_from_env.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    result = fn(*args)
    torch.save(result, Path(out) / f"rank{rank}.pt")


def run_spawned(fn: Callable[..., Any], world: int, tmp: Path, *args: Any) -> list[Any]:
    """``fn(*args)`` on ``world`` processes (torchrun-like environment); returns each rank's result."""
    mp.spawn(_entry, args=(fn, world, free_port(), str(tmp), args), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
