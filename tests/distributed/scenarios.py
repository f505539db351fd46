"""Training loops run both under DDP (one process per replica) and in one process.

Each scenario trains the same float64 MLP on the same oracle data, split the same way:
the global batch of a step is cut into W contiguous rank shards, each into m
micro-batches (:func:`noisescale.distributed.shard_batch`), so that the single process
sees the same ``k = W m`` micro-batches in rank-major order.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from noisescale import GradientNoiseScale, fsdp
from noisescale import distributed as nsdist
from tests import oracle

WORLD = 2
STEPS = 10
PER_EXAMPLE_AVAILABLE = importlib.util.find_spec("noisescale.per_example") is not None

# name -> (global batch per step, micro-batches per rank, options)
SCENARIOS: dict[str, dict[str, Any]] = {
    "one-microbatch": {"batch": 16, "m": 1},
    "accumulation": {"batch": 24, "m": 3, "sync_every": 1},
    "grad-scaler": {"batch": 16, "m": 2, "scaler": True},
    "uneven-final-batch": {"batch": 29, "m": 2, "sizes": [32, 32, 29], "sync_every": 3},
    "sum-reduction": {"batch": 29, "m": 2, "reduction": "sum"},
    # DDP divides by W, one process does not: with lr = 0 both measure at the same weights.
    "sum-accumulation": {"batch": 29, "m": 2, "reduction": "sum", "accumulation": "sum", "lr": 0.0},
    # Losses summed over examples / all examples of the step (x W under DDP): HF Trainer's tokens.
    "example-mean": {
        "batch": 29,
        "m": 2,
        "accumulation": "example_mean",
        "sizes": [29, 31, 16],
        "sync_every": 4,
    },
    # One collective over steps of 1, 3 and 2 backward passes per rank.
    "varying-accumulation": {"batch": 24, "m": 1, "m_per_step": [1, 3, 2], "sync_every": 4},
    "param-groups": {"batch": 16, "m": 2, "optimizer_groups": True},
    "clip-before-update": {"batch": 16, "m": 2, "clip": True},
    "inner-hook": {"batch": 16, "m": 2, "inner_hook": True},
    "forward-outside-no-sync": {"batch": 16, "m": 2, "mode": "forward_outside"},
    # The preconditioned noise scale: fixed weights, and AdamW's (the same state on every rank).
    "preconditioned": {"batch": 16, "m": 2, "preconditioner": "fixed", "sync_every": 3},
    "preconditioned-adam": {"batch": 24, "m": 3, "preconditioner": "adam", "optimizer_groups": True},
}
if PER_EXAMPLE_AVAILABLE:
    SCENARIOS["per-example"] = {"batch": 16, "m": 1, "method": "per_example"}
    SCENARIOS["per-example-accumulation"] = {"batch": 18, "m": 2, "method": "per_example", "sync_every": 3}
    SCENARIOS["per-example-example-mean"] = {
        "batch": 29,
        "m": 2,
        "method": "per_example",
        "accumulation": "example_mean",
    }
    SCENARIOS["per-example-preconditioned-adam"] = {
        "batch": 18,
        "m": 2,
        "method": "per_example",
        "preconditioner": "adam",
        "sync_every": 4,
    }


def make_model() -> nn.Module:
    """Two layers computing the oracle's x.delta at the start, so |G|^2 is large and resolves quickly."""
    model = nn.Sequential(nn.Linear(5, 5, dtype=torch.float64), nn.Linear(5, 1, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(5, dtype=torch.float64))
        model[0].bias.zero_()
        model[1].weight.copy_(oracle.DELTA)
        model[1].bias.zero_()
    return model


def microbatches(step: int, batch: int, ranks: list[int], m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches of ``ranks`` at ``step``, rank-major (all ranks: the single-process split)."""
    x, y = oracle.sample_xy((batch,), torch.Generator().manual_seed(1000 + step))
    out = []
    for r in ranks:
        xr, yr = nsdist.shard_batch(x, y, rank=r, world_size=WORLD)
        out += list(zip(xr.tensor_split(m), yr.tensor_split(m), strict=True))
    return out


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    per_example = 0.5 * (model(x).squeeze(-1) - y).square()
    return per_example.mean() if reduction == "mean" else per_example.sum()


def _optimizer(model: nn.Module, grouped: bool, lr: float, adam: bool = False) -> torch.optim.Optimizer:
    params = list(nsdist.unwrap_model(model).parameters())
    cls = torch.optim.AdamW if adam else torch.optim.SGD
    if not grouped:
        return cls(params, lr=lr)
    weights = [p for p in params if p.dim() > 1]
    biases = [p for p in params if p.dim() == 1]
    return cls(
        [{"params": weights, "name": "weights"}, {"params": biases, "name": "biases", "lr": 0.02}], lr=0.05
    )


def _preconditioner(model: nn.Module, kind: str | None) -> Any:
    """``"adam"``, or fixed weights in [0.5, 1.5) (the same on every rank: a seeded generator)."""
    if kind != "fixed":
        return kind
    gen = torch.Generator().manual_seed(11)
    return {
        p: 0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype)
        for p in nsdist.unwrap_model(model).parameters()
    }


def train(spec: dict[str, Any], model: nn.Module, ranks: list[int]) -> dict[str, Any]:
    """Train STEPS steps; ``ranks`` = [rank] under DDP, all ranks in one process."""
    m_per_step = spec.get("m_per_step", [spec["m"]])
    reduction, accumulation = spec.get("reduction", "mean"), spec.get("accumulation", "mean")
    opt = _optimizer(
        model, spec.get("optimizer_groups", False), spec.get("lr", 0.01), spec.get("preconditioner") == "adam"
    )
    ddp = isinstance(model, nn.parallel.DistributedDataParallel) or fsdp.is_fully_sharded(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if spec.get("scaler") else None
    if spec.get("inner_hook") and isinstance(model, nn.parallel.DistributedDataParallel):
        # the user's own communication hook: the meter reads .grad after it
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.allreduce_hook)
    meter = GradientNoiseScale(
        model,
        method=spec.get("method", "microbatch"),
        reduction=reduction,
        accumulation=accumulation,
        ema_decay=1.0,
        scaler=scaler,
        optimizer=opt if spec.get("optimizer_groups") or spec.get("preconditioner") == "adam" else None,
        preconditioner=_preconditioner(model, spec.get("preconditioner")),
        # Clipping before update() needs the end-of-backward snapshot (under DDP: after the all-reduce).
        read_grad="after_backward" if spec.get("clip") else "at_update",
        sync_every=spec.get("sync_every", 16),  # 16 > STEPS: only the sync() below exchanges
    )
    sizes_per_step = spec.get("sizes", [spec["batch"]] * STEPS)
    caught: list[str] = []
    for step in range(STEPS):
        global_batch = sizes_per_step[step % len(sizes_per_step)]
        m_local = m_per_step[step % len(m_per_step)]
        k = m_local * len(ranks)  # backward passes per step in this process
        mbs = microbatches(step, global_batch, ranks, m_local)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for i, (xb, yb) in enumerate(mbs):
                last = i == len(mbs) - 1

                def forward(
                    xb: torch.Tensor = xb, yb: torch.Tensor = yb, n: int = global_batch, k: int = k
                ) -> torch.Tensor:
                    if accumulation == "example_mean":  # sum / all examples of the step, x W for DDP
                        return _loss(model, xb, yb, "sum") * (WORLD if ddp else 1) / n
                    loss = _loss(model, xb, yb, reduction)
                    return loss / k if accumulation == "mean" else loss

                if spec.get("mode") == "forward_outside":
                    loss = forward()  # DDP decides to sync here
                    ctx = nsdist.grad_sync(model, last=last)
                else:
                    ctx = contextlib.nullcontext()
                with nsdist.grad_sync(model, last=last or spec.get("mode") == "always_sync"), ctx:
                    if spec.get("mode") != "forward_outside":
                        loss = forward()
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            if spec.get("clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            sizes = [len(yb) for _, yb in mbs]
            meter.update(microbatch_sizes=sizes if spec.get("method") != "per_example" else None)
        caught += [str(x.message) for x in w]
        if scaler is not None:
            scaler.step(opt)
            scaler.update(new_scale=[2.0**3, 2.0**17, 1.0][step % 3])
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    meter.sync()  # every rank (a no-op fold in one process)
    return {"estimate": meter.compute().to_dict(), "method": meter.method, "warnings": caught}


def run_single(name: str) -> dict[str, Any]:
    """The reference: one process, all W m micro-batches."""
    return train(SCENARIOS[name], make_model(), list(range(WORLD)))


def _expect_error(fn: Any) -> str:
    try:
        fn()
    except nsdist.DistributedSetupError as exc:
        return str(exc)
    return "no error"


def _all_no_sync(info: nsdist.DistInfo) -> str:
    model = nsdist.wrap_ddp(make_model(), info)
    meter = GradientNoiseScale(model, method="ddp")
    for xb, yb in microbatches(0, 16, [info.rank], 2):
        with model.no_sync():
            _loss(model, xb, yb, "mean").backward()
    return _expect_error(lambda: meter.update(16))


def _rank_zero_alone(info: nsdist.DistInfo) -> dict[str, Any]:
    """sync_every=4 over 10 steps; rank 0 alone computes and resets after step 5 (no collective).

    A second meter, made on every rank after step 5, sees the steps 6-9 that rank 0's
    reset meter keeps.
    """
    model = nsdist.wrap_ddp(make_model(), info)
    meter = GradientNoiseScale(model, method="ddp", sync_every=4, ema_decay=1.0)
    fresh = None
    out: dict[str, Any] = {}
    for step in range(10):
        for i, (xb, yb) in enumerate(microbatches(step, 16, [info.rank], 2)):
            with nsdist.grad_sync(model, last=i == 1):
                (_loss(model, xb, yb, "mean") / 2).backward()
        for m in (meter, fresh):
            if m is not None:
                m.update(microbatch_sizes=[4, 4])
        model.zero_grad(set_to_none=True)
        if step == 5:
            if info.rank == 0:
                out["alone"] = meter.compute().steps
                meter.reset()
            fresh = GradientNoiseScale(model, method="ddp", sync_every=4, ema_decay=1.0)
    assert fresh is not None
    out["before_sync"] = meter.compute().steps
    meter.sync()
    fresh.sync()
    out["after_sync"] = meter.compute().to_dict()
    out["fresh"] = fresh.compute().to_dict()
    fresh.remove()
    for xb, yb in microbatches(10, 8, [info.rank], 1):  # one more step, never exchanged
        _loss(model, xb, yb, "mean").backward()
    meter.update(microbatch_sizes=[4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meter.remove()
    out["remove_warnings"] = [str(w.message) for w in caught]
    return out


def _steps(model: nn.Module, meter: GradientNoiseScale, rank: int, ms: list[int]) -> None:
    """One optimizer step per entry of ``ms``, of that many micro-batches of 4 examples on this rank."""
    for step, m in enumerate(ms):
        for i, (xb, yb) in enumerate(microbatches(step, 8 * m, [rank], m)):
            with nsdist.grad_sync(model, last=i == m - 1):
                (_loss(model, xb, yb, "mean") / m).backward()
        meter.update(microbatch_sizes=[4] * m)
        model.zero_grad(set_to_none=True)


def _remove_alone(info: nsdist.DistInfo) -> int:
    """remove() on rank 0 alone between exchanges, then sync() on every rank: no hang."""
    model = nsdist.wrap_ddp(make_model(), info)
    meter = GradientNoiseScale(model, method="ddp")
    _steps(model, meter, info.rank, [2, 2, 2])
    if info.rank == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meter.remove()
    meter.sync()
    return meter.compute().steps


def _different_backward_passes(info: nsdist.DistInfo) -> str:
    """Rank 0 runs 1 then 3 micro-steps, rank 1 runs 2 and 2: the same rows in all, silently paired."""
    model = nsdist.wrap_ddp(make_model(), info)
    meter = GradientNoiseScale(model, method="ddp", sync_every=2)
    _steps(model, meter, info.rank, [1, 3] if info.rank == 0 else [2, 2])
    return _expect_error(meter.sync)


def worker() -> dict[str, Any]:
    """Every scenario on this rank, under DDP; plus the misuse checks."""
    info = nsdist.init_from_env()
    assert info is not None and info.world_size == WORLD and info.backend == "gloo"
    out: dict[str, Any] = {"rank": info.rank, "rank_zero": nsdist.is_rank_zero()}
    for name, spec in SCENARIOS.items():
        out[name] = train(spec, nsdist.wrap_ddp(make_model(), info), [info.rank])
    out["all-no-sync"] = _all_no_sync(info)
    out["rank-zero-alone"] = _rank_zero_alone(info)
    out["remove-alone"] = _remove_alone(info)
    out["different-backward-passes"] = _different_backward_passes(info)
    dist.barrier()
    dist.destroy_process_group()
    return out
