"""Device checks of the meter on a GPU (issue 18.4): AMP and no host synchronisation per step.

Not run by CI (no GPU there); ``benchmarks/gpu_checks.sh`` runs it with the CUDA overhead benchmark
whenever a GPU is lent. ``--device cpu`` is a smoke run of the same code (CPU autocast; the sync check,
CUDA's, is skipped).

Checks, on the character transformer of ``overhead.py`` (Embedding, LayerNorm, Linear, attention) with
its weights held fixed (lr 0), every configuration on the same batches:

1. ``scaler_exact``: float32 with a ``GradScaler`` (scale 2**16) against float32 without one, on the
   device. Scaling the loss by a power of two scales every float32 gradient exactly (no under- or
   overflow in float32's range), so the meter, which unscales on the device before squaring, must give
   the same |G|^2, tr(Sigma) and B_simple: relative difference <= 1e-6, for ``microbatch`` and
   ``per_example``. (Not in float16: there the scale moves which gradient entries underflow, the reason
   GradScaler exists, so scaled and unscaled float16 runs differ by more than rounding.)
2. ``amp_vs_float32``: float16 autocast with the GradScaler, and bfloat16 autocast, against float32.
   Half precision rounds each gradient by a few units of its roundoff ``u`` (2**-11, 2**-8), and |G|^2 is
   a difference of squared norms that amplifies their relative error by about ``1 + B_simple / B`` (B the
   step's examples), so the tolerance is ``TOL_U * u * (1 + B_simple / B)``; the observed differences are
   recorded next to it. No step may be skipped or contradicted, and the scale must stay 2**16.
3. ``no_host_sync``: backward passes and ``meter.update()`` under ``torch.cuda.set_sync_debug_mode("warn")``
   for ``SYNC_STEPS`` steps after a warm-up (new micro-batch sizes send one small matrix, once): every
   synchronising CUDA call warns, and the steps where one did are recorded with the Python stack of the
   first. In one process the meter folds its pending steps every ``MAX_PENDING`` (32) steps; that
   fold may copy its decays to the device, so at most ``ceil(SYNC_STEPS / 32)`` steps may sync, never
   every step. ``microbatch`` and ``per_example``, with and without a GradScaler (whose own ``step()``
   synchronises, so it runs outside the checked region).

``--floors PATH`` instead checks an ``overhead.py --device cuda`` JSON against the issue's floors:
``microbatch`` <= 1.02x the same accumulation loop and ``per_example`` <= 1.3x a plain step on the
transformer.

Usage::

    PYTHONPATH=src python benchmarks/gpu_checks.py --device cuda --json OUT/gpu_checks.json
    PYTHONPATH=src python benchmarks/gpu_checks.py --floors OUT/overhead_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import CharTransformer

from noisescale import GradientNoiseScale
from noisescale.meter.averages import MAX_PENDING

VOCAB, T, B, K, STEPS, WARMUP, SYNC_STEPS = 65, 64, 32, 4, 24, 3, 64
SCALER_EXACT_REL = 1e-6
TOL_U = 16  # units of roundoff a half-precision gradient's squared norm may move (see the docstring)
ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FLOORS = {"microbatch": 1.02, "per_example": 1.3}


def batches(device: str, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Learnable sequences (each token the previous plus a per-sequence stride), made on the device."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(WARMUP + steps):
        start = torch.randint(VOCAB, (B, 1), generator=gen)
        stride = torch.randint(1, 4, (B, 1), generator=gen)
        seq = (start + stride * torch.arange(T + 1)) % VOCAB
        out.append((seq[:, :-1].to(device), seq[:, 1:].to(device)))
    return out


def make_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return CharTransformer(vocab=VOCAB, context=T).to(device)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@contextlib.contextmanager
def sync_checked(on: bool, seen: list[str]) -> Iterator[None]:
    """While ``on``: ``set_sync_debug_mode("warn")``, each synchronising call's stack put in ``seen``."""
    if not on:
        yield
        return

    def record(message: Any, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" in str(message):  # torch's "called a synchronizing CUDA operation"
            seen.append(f"{message}\n{''.join(traceback.format_stack(limit=30))}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


def measure(
    device: str, method: str, dtype: torch.dtype | None, scale: float | None, check_sync: bool = False
) -> dict[str, Any]:
    """One run of WARMUP + STEPS steps at fixed weights; the estimate, or where a host sync happened."""
    model = make_model(device)
    dev = torch.device(device).type
    scaler = torch.amp.GradScaler(dev, init_scale=scale) if scale is not None else None
    meter = GradientNoiseScale(model, method=method, ema_decay=1.0, scaler=scaler)
    k = K if method == "microbatch" else 1
    synced: dict[int, list[str]] = {}
    for step, (x, y) in enumerate(batches(device, SYNC_STEPS if check_sync else STEPS)):
        seen: list[str] = []
        with sync_checked(check_sync and step >= WARMUP, seen):
            for xb, yb in zip(x.chunk(k), y.chunk(k), strict=True):
                ctx = torch.autocast(dev, dtype=dtype) if dtype is not None else contextlib.nullcontext()
                with ctx:
                    loss = loss_fn(model(xb), yb) / k
                (scaler.scale(loss) if scaler is not None else loss).backward()
            meter.update(microbatch_sizes=[B // k] * k if method == "microbatch" else None)
        if seen:
            synced[step] = seen
        if scaler is not None:  # lr 0: the weights stay; the scaler's step/update synchronise, unchecked
            scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
            scaler.update()
        model.zero_grad(set_to_none=True)
    if check_sync:
        meter.remove()
        first = next(iter(synced.values()), [])
        return {"checked_steps": SYNC_STEPS, "steps_with_sync": sorted(synced), "first_sync": first[:3]}
    est = meter.compute()
    meter.remove()
    return {
        "b_simple": est.b_simple,
        "grad_norm_sq": est.grad_norm_sq,
        "trace_sigma": est.trace_sigma,
        "steps": est.steps,
        "skipped_steps": est.skipped_steps,
        "contradiction": est.contradiction,
        "final_scale": None if scaler is None else scaler.get_scale(),
    }


def rel(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return float("inf")
    return abs(a - b) / abs(b)


def amp_checks(device: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("microbatch", "per_example"):
        ref = measure(device, method, None, None)
        scaled = measure(device, method, None, 2.0**16)
        fp16 = measure(device, method, torch.float16, 2.0**16)
        bf16 = measure(device, method, torch.bfloat16, None)
        keys = ("grad_norm_sq", "trace_sigma", "b_simple")
        exact = max(rel(scaled[key], ref[key]) for key in keys)
        out[f"scaler_exact/{method}"] = {
            "max_rel_diff": exact,
            "tolerance": SCALER_EXACT_REL,
            "ok": exact <= SCALER_EXACT_REL and scaled["final_scale"] == 2.0**16,
            "scaled": scaled,
            "float32": ref,
        }
        amplify = 1 + (ref["b_simple"] or float("inf")) / B
        for name, got, dtype in (("float16", fp16, torch.float16), ("bfloat16", bf16, torch.bfloat16)):
            diff = max(rel(got[key], ref[key]) for key in keys)
            tol = TOL_U * ROUNDOFF[dtype] * amplify
            clean = got["skipped_steps"] == 0 and got["contradiction"] is None
            clean = clean and got["steps"] == ref["steps"] and got["final_scale"] in (None, 2.0**16)
            out[f"amp_vs_float32/{method}/{name}"] = {
                "max_rel_diff": diff,
                "tolerance": tol,
                "ok": diff <= tol and clean,
                "amp": got,
                "float32": ref,
            }
    return out


def sync_checks(device: str) -> dict[str, Any]:
    if torch.device(device).type != "cuda":
        return {"no_host_sync": {"ok": None, "skipped": "not a CUDA device"}}
    out: dict[str, Any] = {}
    for method in ("microbatch", "per_example"):
        for scale, dtype, name in ((None, None, "float32"), (2.0**16, torch.float16, "float16+GradScaler")):
            got = measure(device, method, dtype, scale, check_sync=True)
            allowed = math.ceil(SYNC_STEPS / MAX_PENDING)  # the one-process fold of the pending steps
            ok = len(got["steps_with_sync"]) <= allowed
            out[f"no_host_sync/{method}/{name}"] = {**got, "allowed_steps_with_sync": allowed, "ok": ok}
    return out


def floors(path: Path) -> dict[str, Any]:
    records = json.loads(path.read_text())["records"]
    out: dict[str, Any] = {}
    for r in records:
        if r["model"] == "transformer" and r["method"] in FLOORS and r["status"] == "ok":
            limit = FLOORS[r["method"]]
            out[f"floor/transformer/{r['method']}"] = {
                "ratio_median": r["ratio_median"],
                "ratio_quartiles": r["ratio_quartiles"],
                "baseline": r["baseline"],
                "floor": limit,
                "ok": r["ratio_median"] <= limit,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--floors", type=Path, default=None, help="check an overhead.py --device cuda JSON")
    args = p.parse_args(argv)
    if args.floors is not None:
        results = floors(args.floors)
    else:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print("no CUDA device: run with --device cpu for a smoke run", file=sys.stderr)
            return 2
        results = {**amp_checks(args.device), **sync_checks(args.device)}
        results["machine"] = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
        }
    for name, r in results.items():
        if name != "machine":
            verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[r["ok"]]
            shown = ("max_rel_diff", "tolerance", "ratio_median", "floor", "steps_with_sync")
            detail = {k: r[k] for k in shown if k in r}
            print(f"{verdict} {name} {detail}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0 if all(r["ok"] is not False for n, r in results.items() if n != "machine") else 1


if __name__ == "__main__":
    raise SystemExit(main())
