"""Does B_crit depend on the path? Runs that switch batch size along training, against a sweep's fixed ones.

A sweep's ``B_crit(L) = E_min/S_min`` comes from runs that keep one batch size from initialisation
to the loss ``L``; a branched value (``noisescale branch``) is the trade-off from a small-batch
run's checkpoint. If the examples a run needs to go from a state to ``L`` depended only on the loss
of that state, the two would agree. This script tests that directly: from the base run's
checkpoints of a finished branched measurement (``--branch``), it continues at a larger batch
``kappa B`` (the branches' learning-rate rule) until the training loss on the same fixed subset
first reaches the goal (``--goal``), and compares the images that switching run spent from
initialisation with what the sweep's runs at that batch needed from initialisation
(``results.csv``, the best learning rate per batch) and with the base batch's own continuation.
A switching run that reaches the goal with far fewer images than the fixed run at its final batch
shows that B_crit depends on the path (the states a small batch passes through let a large batch
train efficiently later), so a branched B_crit need not equal the sweep's late in training.

    python benchmarks/switch_vs_fixed.py --branch runs/branch-vs-sweep/sweep --sweep runs/sweep-mnist \\
        --json benchmarks/results/switch_vs_fixed.json --markdown benchmarks/results/switch_vs_fixed.md

Each (point, batch) runs ``--replicas`` data streams (none of them the branches' streams); the
table gives their median and range. Checks every ``max(--check-every, kappa B)`` images.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162, sec. 2.2.
    Merrill et al. (2025), Critical Batch Size Revisited, arXiv:2505.23971, section 3.1.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from noisescale.errors import BranchConfigError
from noisescale.experiments.branch import BranchConfig
from noisescale.experiments.branch.run import branch_seed, load_state, restore_state
from noisescale.experiments.evaluation import Probe
from noisescale.experiments.tasks import get_task
from noisescale.experiments.training import Trainer
from noisescale.io import atomic_write_text, write_json

REPLICA_OFFSET = 1000  # data streams apart from the branches' (replicas 0, 1, 2, ...)
CHECK_EVERY = 2048  # images between two evaluations of the training loss (at least one step)


def images_to_goal(
    folder: Path, config: BranchConfig, point: int, kappa: int, replica: int, goal: float, cap: int
) -> int | None:
    """Images after checkpoint ``point`` of ``folder`` at ``kappa B`` until the probe's loss is <= ``goal``.

    Returns:
        The images (a multiple of the check interval), or None if ``cap`` images did not reach it.
    """
    task = get_task(config.task)
    state = load_state(folder, point)
    size, lr = kappa * config.batch_size, config.branch_lr(kappa)
    every = max(CHECK_EVERY, size) // size * size
    seed = branch_seed(config.seed, point, REPLICA_OFFSET + replica)
    train = config.train_config(task, batch_size=size, lr=lr, method=None, microbatches=1, seed=seed)
    probe = Probe(task, config.eval_examples, 0)
    with Trainer(task, train) as trainer:
        restore_state(trainer, state, lr=lr)
        begin = trainer.examples
        while trainer.examples - begin < cap:
            for _ in range(every // size):
                trainer.step()
            loss = probe.train_loss(trainer.model)
            if not math.isfinite(loss):
                return None
            if loss <= goal:
                return trainer.examples - begin
    return None


def sweep_examples(folder: Path, goal: float) -> dict[int, float]:
    """Per batch size, the images the sweep's best run at that batch needed to reach ``goal``.

    Raises:
        SystemExit: without a ``results.csv``, or when ``goal`` is not one of its training-loss goals.
    """
    path = folder / "results.csv"
    if not path.is_file():
        raise SystemExit(f"no {path}: give --sweep a finished `noisescale sweep` directory")
    out, goals = {}, set()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["metric"] != "train_loss":
                continue
            goals.add(float(row["goal"]))
            if float(row["goal"]) == goal and row["reached"] == "True":
                out[int(row["batch_size"])] = float(row["steps"]) * int(row["batch_size"])
    if goal not in goals:
        raise SystemExit(f"the sweep has no training-loss goal {goal:g}: give --goal one of {sorted(goals)}")
    return out


def load_branch(folder: Path) -> tuple[BranchConfig, dict[str, Any]]:
    """A finished branched measurement's settings and base record.

    Raises:
        SystemExit: if ``folder`` holds none (or an unfinished one), naming the fix.
    """
    paths = [folder / "config.json", folder / "base.json"]
    if not all(p.is_file() for p in paths):
        raise SystemExit(
            f"{folder} holds no finished branched measurement (config.json and base.json): run "
            "`noisescale branch` or benchmarks/branch_vs_sweep.py first and give its directory to --branch"
        )
    try:
        config = BranchConfig.from_dict(json.loads(paths[0].read_text()))
    except (BranchConfigError, TypeError) as err:
        raise SystemExit(f"{paths[0]} is not a branched measurement's settings: {err}") from None
    return config, json.loads(paths[1].read_text())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the switching runs and write the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--branch", type=Path, default=Path("runs/branch-vs-sweep/sweep"))
    p.add_argument("--sweep", type=Path, default=Path("runs/sweep-mnist"))
    p.add_argument("--goal", type=float, default=0.1, help="training loss (one of the sweep's goals)")
    p.add_argument("--points", type=int, nargs="+", default=[8192, 16384], help="base images to switch at")
    p.add_argument("--kappas", type=_positive, nargs="+", default=[1, 8, 32], help="multipliers of B")
    p.add_argument("--replicas", type=_positive, default=3)
    p.add_argument("--cap", type=_positive, default=400_000, help="images after the switch before giving up")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    config, base = load_branch(args.branch)
    index = {int(pt["examples"]): pt["index"] for pt in base["points"]}
    missing = [x for x in args.points if x not in index]
    if missing:
        raise SystemExit(f"no branch point at {missing} images; the points are {sorted(index)}")
    sweep = sweep_examples(args.sweep, args.goal)  # before any training: a wrong goal fails at once
    unit = get_task(config.task).unit
    rows, t0 = [], time.process_time()
    for at in args.points:
        for kappa in args.kappas:
            spent = [
                images_to_goal(args.branch, config, index[at], kappa, r, args.goal, args.cap)
                for r in range(args.replicas)
            ]
            reached = [at + s for s in spent if s is not None]
            size = kappa * config.batch_size
            rows.append(
                {
                    "switch_at": at,
                    "batch_size": size,
                    "lr": config.branch_lr(kappa),
                    "images_from_init": [None if s is None else at + s for s in spent],
                    "median": statistics.median(reached) if len(reached) == len(spent) else None,
                    "sweep_fixed": sweep.get(size),
                    "sweep_base": sweep.get(config.batch_size),
                }
            )
            print(rows[-1], flush=True)
    result = {
        "task": config.task,
        "unit": unit,
        "goal": args.goal,
        "base_batch": config.batch_size,
        "base_lr": config.lr,
        "rows": rows,
        "cpu_s": time.process_time() - t0,
    }
    if args.json:
        write_json(args.json, result)
    if args.markdown:
        atomic_write_text(args.markdown, markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table."""
    unit, b = result["unit"], result["base_batch"]
    lines = [
        f"| switch at ({unit}) | batch after | images from init to loss {result['goal']:g}: median (runs) "
        f"| sweep's fixed run at that batch | sweep's fixed run at {b} |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        runs = ", ".join("not reached" if v is None else f"{v:,}" for v in r["images_from_init"])
        median = "-" if r["median"] is None else f"{r['median']:,.0f}"
        fixed = "-" if r["sweep_fixed"] is None else f"{r['sweep_fixed']:,.0f}"
        base = "-" if r["sweep_base"] is None else f"{r['sweep_base']:,.0f}"
        after = f"{r['batch_size']} (lr {r['lr']:.3g})" + (" (no switch)" if r["batch_size"] == b else "")
        lines.append(f"| {r['switch_at']:,} | {after} | {median} ({runs}) | {fixed} | {base} |")
    lines.append("")
    lines.append(f"{result['cpu_s']:.0f} s of CPU.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
