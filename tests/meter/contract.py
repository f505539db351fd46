"""The shared contract every meter method passes, as one run that returns what it saw.

:func:`run` trains the float64 MLP of :mod:`tests.distributed.scenarios` for a few steps and
exercises the meter's contract on the way: ``compute()`` before any update, a ``state_dict``
saved mid-run (through ``torch.save``) and loaded into a second meter that must end
identical, ``reset()`` against a fresh meter, and pickling. The same function runs in one
process (all ``W x m`` micro-batches) and on every DDP rank (its own ``m``); ``test_contract``
compares the two. :func:`worker` is the DDP side, one spawn for every case, plus the issue 13
#4 repro: a DDP communication hook that sums the replicas without dividing by W (under
``ddp`` and ``per_example``), and :func:`uneven_run`, the rank-level check's false-positive runs.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from noisescale import GradientNoiseScale
from noisescale import distributed as nsdist
from tests import oracle
from tests.distributed import scenarios

STEPS = 16  # 8 before the state_dict is saved / the reset, 8 after
SAVE_AT = 8
BATCH = 16  # global examples per step
M = 2  # micro-batches per rank per step
DATASET_SIZE = 64  # the oracle's draws are with replacement: any N >= BATCH exercises the same code
VARIANTS = {  # name -> (method given to the meter, runs under DDP)
    "microbatch": ("microbatch", False),
    "per_example": ("per_example", False),
    "ddp": ("ddp", True),
    "per_example-ddp": ("per_example", True),
}


def _error(fn: Any) -> str:
    try:
        fn()
    except TypeError as exc:
        return str(exc)
    return "no error"


def _step(model: nn.Module, meters: list[GradientNoiseScale], step: int, ranks: list[int], m: int) -> None:
    mbs = scenarios.microbatches(step, BATCH, ranks, m)
    for i, (xb, yb) in enumerate(mbs):
        with nsdist.grad_sync(model, last=i == len(mbs) - 1):
            (0.5 * (model(xb).squeeze(-1) - yb).square().mean() / len(mbs)).backward()
    for meter in meters:
        meter.update(microbatch_sizes=None if meter.method == "per_example" else [len(yb) for _, yb in mbs])


def run(variant: str, dataset_size: int | None, info: nsdist.DistInfo | None = None) -> dict[str, Any]:
    """The contract run of one variant: in one process (``info`` None) or on one DDP rank."""
    method, _ = VARIANTS[variant]
    model: nn.Module = scenarios.make_model()
    ranks = list(range(scenarios.WORLD))
    if info is not None:
        model, ranks = nsdist.wrap_ddp(model, info), [info.rank]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def meter() -> GradientNoiseScale:
        return GradientNoiseScale(
            model, method=method, ema_decay=0.95, sync_every=3, dataset_size=dataset_size
        )  # type: ignore[arg-type]

    full, reset = meter(), meter()
    out: dict[str, Any] = {"before": full.compute().to_dict(), "method": full.method}
    out["pickle"] = _error(lambda: pickle.dumps(full))
    out["deepcopy"] = _error(lambda: copy.deepcopy(full))
    resumed = fresh = None
    for step in range(STEPS):
        if step == SAVE_AT:
            full.sync()  # every rank: a state_dict holds the steps exchanged so far
            buffer = io.BytesIO()
            torch.save(full.state_dict(), buffer)
            buffer.seek(0)
            resumed = meter()
            resumed.load_state_dict(torch.load(buffer, weights_only=True))
            reset.reset()
            out["after_reset"] = reset.compute().to_dict()
            fresh = meter()
        _step(model, [m for m in (full, reset, resumed, fresh) if m is not None], step, ranks, M)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert resumed is not None and fresh is not None
    for name, m in (("full", full), ("resumed", resumed), ("reset", reset), ("fresh", fresh)):
        m.sync()
        out[name] = m.compute().to_dict()
    return out


def _summing_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks the annotations as objects
    """A communication hook that sums the replicas' gradients and forgets to divide by W."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()  # type: ignore[union-attr]
    return fut.then(lambda f: f.value()[0])


def _scaled_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks the annotations as objects
    """A communication hook that all-reduces with SUM, then multiplies by ``state`` (1/W: DDP's mean)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()  # type: ignore[union-attr]
    return fut.then(lambda f: f.value()[0].mul_(state))


def _estimate(meter: GradientNoiseScale) -> dict[str, Any]:
    """Every step exchanged, then the estimate, the warnings compute() gave and the contradicted steps."""
    meter.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimate = meter.compute().to_dict()
    contradicted = meter.state_dict()["contradicted_steps"].tolist()
    return {"estimate": estimate, "warnings": [str(w.message) for w in caught], "contradicted": contradicted}


def summing_hook_run(
    info: nsdist.DistInfo | None, method: str = "ddp", hook: str | None = "sum"
) -> dict[str, Any]:
    """Issue 13 #4's repro: one micro-batch of 8 per rank, a hook that sums without dividing.

    ``hook``: ``"sum"`` that hook, ``"allreduce"`` DDP's default hook, None DDP's own all-reduce;
    ``info`` None: one process over both ranks' micro-batches (the reference).
    """
    model: nn.Module = scenarios.make_model()
    ranks = list(range(scenarios.WORLD))
    if info is not None:
        model, ranks = nsdist.wrap_ddp(model, info), [info.rank]
        if hook is not None:
            model.register_comm_hook(None, _summing_hook if hook == "sum" else default_hooks.allreduce_hook)
    meter = GradientNoiseScale(model, method=method, ema_decay=1.0)  # type: ignore[arg-type]
    for step in range(scenarios.STEPS):
        mbs = scenarios.microbatches(step, 16, ranks, 1)
        for xb, yb in mbs:
            (0.5 * (model(xb).squeeze(-1) - yb).square().mean() / len(mbs)).backward()
        meter.update(8 * len(mbs))
        model.zero_grad(set_to_none=True)
    return _estimate(meter)


UNEVEN_SIZES = ((3, 6), (3, 3))  # m = 2 micro-batches per rank, 9 and 6 examples
UNEVEN_CASES = [  # (dtype, accumulation, identical micro-batch means, hook scale: None = DDP's own)
    (dtype, accumulation, True, scale)
    for dtype in ("float64", "float32")
    for accumulation in ("mean", "example_mean")
    for scale in (None, 1.0, 1.01 / scenarios.WORLD, 0.99 / scenarios.WORLD)
] + [("float32", accumulation, False, None) for accumulation in ("mean", "example_mean")]


def uneven_run(
    info: nsdist.DistInfo, dtype: str, accumulation: str, identical: bool, scale: float | None
) -> Any:
    """per_example under DDP, ranks of uneven sizes, m = 2, ``dataset_size`` given (no optimizer step).

    ``identical``: every micro-batch of a step repeats the same 3 examples, so every backward pass's
    mean-loss gradient is the same and the rank-level Jensen gap is zero but for rounding (the
    per-example one is not). ``scale``: a comm hook that sums and multiplies by it (1.01 / W makes the
    big batch 2% too large: flagged; 0.99 / W 2% too small: a mean can be that, not flagged).
    """
    model = nsdist.wrap_ddp(scenarios.make_model().to(getattr(torch, dtype)), info)
    if scale is not None:
        model.register_comm_hook(scale, _scaled_hook)
    meter = GradientNoiseScale(
        model, method="per_example", accumulation=accumulation, ema_decay=1.0, sync_every=3, dataset_size=32
    )  # type: ignore[arg-type]
    sizes, total = UNEVEN_SIZES[info.rank], sum(map(sum, UNEVEN_SIZES))
    gen = torch.Generator().manual_seed(7 + (0 if identical else info.rank))
    for _ in range(scenarios.STEPS):
        x, y = (t.to(getattr(torch, dtype)) for t in oracle.sample_xy((6,), gen))
        for i, n in enumerate(sizes):
            idx = torch.arange(n) % 3 if identical else torch.randperm(6, generator=gen)[:n]
            with nsdist.grad_sync(model, last=i == len(sizes) - 1):
                loss = 0.5 * (model(x[idx]).squeeze(-1) - y[idx]).square()
                mean = (
                    loss.sum() * scenarios.WORLD / total
                    if accumulation == "example_mean"
                    else loss.mean() / 2
                )
                mean.backward()
        meter.update()
        model.zero_grad(set_to_none=True)
    return _estimate(meter)


def worker() -> dict[str, Any]:
    """Every DDP variant's contract run on this rank, with and without ``dataset_size``; the hook repro."""
    info = nsdist.init_from_env()
    assert info is not None and info.world_size == scenarios.WORLD
    out: dict[str, Any] = {}
    for variant, (_, ddp) in VARIANTS.items():
        if ddp:
            for n in (None, DATASET_SIZE):
                out[f"{variant}/{n}"] = run(variant, n, info)
    out["summing-hook"] = summing_hook_run(info)
    for hook in ("sum", "allreduce", None):
        out[f"per_example-hook/{hook}"] = summing_hook_run(info, "per_example", hook)
    for case in UNEVEN_CASES:
        out[f"uneven/{case}"] = uneven_run(info, *case)
    dist.barrier()
    dist.destroy_process_group()
    return out
