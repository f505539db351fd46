"""Cost of the preconditioned noise scale (``preconditioner="adam"``) next to the raw one.

On the benchmark models of ``overhead.py`` (default: its character transformer), every
configuration runs complete AdamW steps on its own copy of the same model:

==================  ==========================================================================
config              one step
==================  ==========================================================================
``plain``           forward + backward on the whole batch + AdamW step
``accum``           the same batch as ``k`` micro-batches (loss / k each) + AdamW step
``per_example``     ``plain`` + ``GradientNoiseScale(method="per_example").update``
``per_example+P``   the same meter with ``optimizer=opt, preconditioner="adam"``
``microbatch``      ``accum`` + ``GradientNoiseScale(method="microbatch").update``
``microbatch+P``    the same meter with ``optimizer=opt, preconditioner="adam"``
==================  ==========================================================================

The machine is shared, so only ratios of interleaved repeats mean something: in each round
every configuration runs a block of ``--steps`` steps, in an order rotated each round, and a
configuration's ratio is its process CPU time per step over that of its reference IN THE SAME
ROUND (``+P`` over the raw meter, the meter over ``plain``/``accum``). The table gives the
median ratio over rounds and its interquartile range. One torch thread, ``OMP_WAIT_POLICY=PASSIVE``.

Usage::

    python benchmarks/preconditioned.py                      # transformer, 7 rounds
    python benchmarks/preconditioned.py --models mlp transformer --rounds 11 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see overhead.py)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import SPECS, ModelSpec  # a sibling script

from noisescale import GradientNoiseScale

CONFIGS = ("plain", "accum", "per_example", "per_example+P", "microbatch", "microbatch+P")
REFERENCE = {
    "per_example": "plain",
    "per_example+P": "per_example",
    "microbatch": "accum",
    "microbatch+P": "microbatch",
}


def build(spec: ModelSpec, config: str, k: int) -> Callable[[], None]:
    """A fresh model (the same weights for every config), a fixed batch, and one AdamW step of ``config``."""
    torch.manual_seed(0)
    model = spec.build()
    x, y = spec.data(spec.batch_size, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    method = config.removesuffix("+P")
    meter = None
    if method in ("per_example", "microbatch"):
        extra = {"optimizer": opt, "preconditioner": "adam"} if config.endswith("+P") else {}
        meter = GradientNoiseScale(model, method=method, **extra)  # type: ignore[arg-type]
    parts = [(x, y)] if method in ("plain", "per_example") else list(zip(x.chunk(k), y.chunk(k), strict=True))

    def step() -> None:
        for xb, yb in parts:
            (spec.loss(model(xb), yb) / len(parts)).backward()
        if meter is not None:
            meter.update(batch_size=spec.batch_size)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(spec: ModelSpec, rounds: int, steps: int, k: int) -> dict[str, dict[str, float]]:
    """Median CPU ms per step and median ratio to the reference, per config."""
    runs = {c: build(spec, c, k) for c in CONFIGS}
    for step in runs.values():  # warm-up: allocator, Adam state, the meters' caches
        for _ in range(3):
            step()
    cpu: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(rounds):
        order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
        for c in order:
            start = time.process_time()
            for _ in range(steps):
                runs[c]()
            cpu[c].append((time.process_time() - start) / steps * 1e3)
    out = {}
    for c in CONFIGS:
        row = {"cpu_ms_median": statistics.median(cpu[c])}
        if c in REFERENCE:
            ratios = [a / b for a, b in zip(cpu[c], cpu[REFERENCE[c]], strict=True)]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            row |= {"ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2]}
        out[c] = row
    return out


def main() -> None:
    """Run the configurations and print (and optionally save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["transformer"], choices=sorted(SPECS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--k", type=int, default=4, help="micro-batches of accum / microbatch")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    print("| model | config | CPU ms/step (median) | ratio to | median ratio [IQR] |\n|---|---|---|---|---|")
    for name in args.models:
        results[name] = measure(SPECS[name], args.rounds, args.steps, args.k)
        for c, row in results[name].items():
            ref = REFERENCE.get(c, "")
            ratio = f"{row['ratio_median']:.3f} [{row['ratio_q1']:.3f}, {row['ratio_q3']:.3f}]" if ref else ""
            print(f"| {name} | {c} | {row['cpu_ms_median']:.1f} | {ref} | {ratio} |")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": results})
        )


if __name__ == "__main__":
    main()
