"""An adaptive batch against the fixed-batch sweep of the same task (issue 15, item 5).

Trains the sweep's task once with ``noisescale measure --adaptive``'s trainer (the batch follows the
measured B_simple by integer factors, the learning rate follows the optimizer's rule), checks the
sweep's goals exactly as the sweep's runs are checked (the same probe and geometric schedule of
checks, the same interpolated crossing), and puts the run's steps S and examples E to each goal
next to the sweep's fitted hyperbola S(B) = S_min (1 + B_crit / B), E = B S
(McCandlish et al. 2018, eqs. 2.11-2.12; appendix D: an adaptive batch can land inside it):

- ``product`` = (S/S_min - 1)(E/E_min - 1): 1 on the constant-batch front, below 1 inside it;
- ``fixed_steps``: the steps of the fixed batch that spends the same E on the fitted front,
  ``S_min (1 + 1/(E/E_min - 1))``, and ``step_saving`` = 1 - S / fixed_steps (the issue's goal: 30%).

It starts at ``--batch-size`` with the learning rate the sweep found fastest there (on the first goal,
reached while the batch is still the initial one), or the sweep's rule when the batch is not in the
grid. The SGD rule (eq. 2.6, B_simple for B_noise) raises the rate with the batch, never above the
sweep's ``lr_max`` (the eps_max of its rule ``lr_max / (1 + B*/B)``; ``--max-lr`` to change it): B_simple
overestimates B_noise on MNIST (B_simple/B_crit up to 2.5), and uncapped runs climbed to lr 2.6-4
from 0.67, past the edge of stability.

Run (the sweep first, then this; the sweep's directory holds config.json and results.csv)::

    noisescale sweep --task mnist --out runs/sweep-mnist --jobs 2
    python benchmarks/adaptive.py --sweep runs/sweep-mnist --batch-size 32 \\
        --json benchmarks/results/adaptive_mnist.json --markdown benchmarks/results/adaptive_mnist.md \\
        --plot benchmarks/results/adaptive_mnist.png
    python benchmarks/adaptive.py --quick     # digits, against examples/sweep.csv: seconds

A results.csv without its config.json takes the task's sweep defaults (``--task``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from noisescale._format import format_batch
from noisescale.critical.plotting import plot_pareto_front
from noisescale.critical.report import FitReport, GoalFit, report_from_file
from noisescale.experiments.adaptive import AdaptiveSettings
from noisescale.experiments.evaluation import Probe
from noisescale.experiments.sweep.config import Goal, SweepConfig
from noisescale.experiments.sweep.run import _check, goal_crossing  # the sweep's own check of a run
from noisescale.experiments.sweep.store import CurvePoint
from noisescale.experiments.tasks import get_task
from noisescale.experiments.training import Trainer
from noisescale.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def load_sweep(path: Path, task: str | None) -> tuple[SweepConfig, Path]:
    """The sweep's settings and its results.csv (a directory, or a CSV with ``task``'s defaults)."""
    if path.is_dir():
        return SweepConfig.from_dict(json.loads((path / "config.json").read_text())), path / "results.csv"
    if task is None:
        raise SystemExit(f"{path} is a results.csv without its config.json: give --task")
    return SweepConfig.for_task(task), path


def initial_lr(report: FitReport, config: SweepConfig, batch_size: int) -> float:
    """The learning rate of the fastest sweep run at ``batch_size`` on the first goal it reached."""
    for g in report.goals:
        rows = g.points[(g.points["batch_size"] == batch_size) & g.points["reached"]]
        if len(rows) and "lr" in rows and not math.isnan(float(rows["lr"].iloc[0])):
            return float(rows["lr"].iloc[0])
    return config.learning_rate(batch_size, 0)


@dataclasses.dataclass
class AdaptiveRun:
    """The checks of the adaptive run, the examples seen after each step, its schedule and wall time."""

    curve: list[CurvePoint]
    examples: list[int]  # [steps + 1]: examples seen after each step, from 0
    schedule: list[dict[str, Any]]
    wall_time_s: float
    lr: float


def train_adaptive(
    config: SweepConfig, batch_size: int, lr: float, settings: AdaptiveSettings
) -> AdaptiveRun:
    """Train until every goal is reached or the sweep's budget (examples, steps) of a run is spent."""
    task = get_task(config.task)
    run_config = dataclasses.replace(
        config.train_config(batch_size, lr), steps=config.max_steps, measure_every=10
    )  # the controller looks at the estimate every 10 steps
    probe = Probe(task, config.eval_examples, config.eval_test_examples)
    goals, start = config.goals, time.perf_counter()
    done, curve, examples, next_check = [False] * len(goals), [], [0], 0
    with Trainer(task, run_config, adaptive=settings) as trainer:
        for step in range(config.max_steps + 1):
            if step:
                examples.append(trainer.step().examples)
            spent = examples[-1] >= config.max_examples or step == config.max_steps
            if step < next_check and not spent:
                continue
            next_check = max(step + 1, math.ceil(step * config.eval_growth))
            curve.append(_check(trainer, probe, step, goals, done))
            if all(done) or spent:
                break
        assert trainer.controller is not None
        schedule = [c.to_dict() for c in trainer.controller.schedule]
    return AdaptiveRun(curve, examples, schedule, time.perf_counter() - start, lr)


def to_goal(run: AdaptiveRun, goal: Goal) -> tuple[float, float] | None:
    """Steps and examples to ``goal`` (the crossing interpolated between checks), or None if not reached."""
    c = goal_crossing(run.curve, goal)
    if not c.reached or c.steps is None:
        return None
    whole = min(int(c.steps), len(run.examples) - 2)
    frac = c.steps - whole
    return c.steps, run.examples[whole] + frac * (run.examples[whole + 1] - run.examples[whole])


def compare(g: GoalFit, reached: tuple[float, float] | None) -> dict[str, Any]:
    """The adaptive point against the sweep's hyperbola for one goal."""
    out: dict[str, Any] = {"metric": g.metric, "goal": g.goal, "steps": None, "examples": None}
    if g.fit is not None:
        out.update(
            b_crit=g.fit.b_crit, b_crit_fit=g.fit.b_crit_fit, s_min=g.fit.s_min, e_min=g.fit.e_min,
            scatter=g.fit.residual_sd,  # the sweep's runs scatter about this much (log steps) around the fit
        )  # fmt: skip
    if reached is None or g.fit is None:
        return out
    s, e = reached
    fit = g.fit
    out.update(steps=s, examples=e, product=(s / fit.s_min - 1) * (e / fit.e_min - 1))
    if e > fit.e_min:
        fixed = fit.s_min * (1 + 1 / (e / fit.e_min - 1))
        out.update(
            fixed_batch=fit.b_crit_fit * (e / fit.e_min - 1), fixed_steps=fixed, step_saving=1 - s / fixed
        )
    fastest = g.points[g.points["reached"]]
    out["sweep"] = [
        {"batch_size": int(r.batch_size), "steps": float(r.steps), "examples": float(r.batch_size * r.steps)}
        for r in fastest.itertuples()
    ]
    return out


def markdown(rows: list[dict[str, Any]], unit: str) -> str:
    """The comparison as a Markdown table."""
    head = f"| goal | S (steps) | E ({unit}) | S_min | E_min | B_crit | (S/S_min-1)(E/E_min-1) |"
    lines = [
        head + " fixed batch, same E: steps | fewer steps | sweep scatter |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"{r['metric'].replace('_', ' ')} {r['goal']:g}"
        if r["steps"] is None:
            lines.append(f"| {name} | not reached | | | | | | | | |")
            continue
        saving = "" if "step_saving" not in r else f"{r['step_saving']:.0%}"
        fixed = (
            "" if "fixed_steps" not in r else f"{r['fixed_steps']:.0f} (B = {format_batch(r['fixed_batch'])})"
        )
        b_crit = "not bracketed" if r.get("b_crit") is None else format_batch(r["b_crit"])
        lines.append(
            f"| {name} | {r['steps']:.0f} | {r['examples']:,.0f} | {r['s_min']:.0f} | {r['e_min']:,.0f} | "
            f"{b_crit} | {r['product']:.2f} | {fixed} | {saving} | {r['scatter']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options, train, compare, write the JSON, Markdown and plot asked for."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sweep", type=Path, help="sweep directory (config.json, results.csv) or a results.csv"
    )
    parser.add_argument("--task", help="the task of a results.csv without config.json")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="initial batch (default: the sweep's smallest)"
    )
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--critical-factor", type=float, default=None)
    parser.add_argument("--exchange-rate", type=float, default=None)
    parser.add_argument("--max-lr", type=float, default=None, help="the lr cap (default: the sweep's lr_max)")
    parser.add_argument(
        "--seed", type=int, default=None, help="initial weights and data (default: the sweep's)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--quick", action="store_true", help="digits against examples/sweep.csv (seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sweep, args.task = args.sweep or ROOT / "examples" / "sweep.csv", args.task or "digits"
    if args.sweep is None:
        parser.error("give --sweep (or --quick)")
    torch.set_num_threads(args.threads)
    config, results = load_sweep(args.sweep, args.task)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    report = report_from_file(results)
    b0 = args.batch_size or config.batch_sizes[0]
    cap = config.lr_max if args.max_lr is None else args.max_lr
    settings = AdaptiveSettings(args.max_batch_size, args.critical_factor, args.exchange_rate, max_lr=cap)
    run = train_adaptive(config, b0, initial_lr(report, config, b0), settings)
    goals = {(g.metric, g.goal): g for g in report.goals}
    rows = [compare(goals[(goal.metric, goal.level)], to_goal(run, goal)) for goal in config.goals]
    result = {
        "task": config.task,
        "seed": config.seed,
        "unit": report.unit,
        "sweep": str(args.sweep),
        "batch_size": b0,
        "lr": run.lr,
        "adaptive": dataclasses.asdict(settings),
        "batch_schedule": run.schedule,
        "steps_run": len(run.examples) - 1,
        "examples_run": run.examples[-1],
        "wall_time_s": run.wall_time_s,
        "threads": args.threads,
        "goals": rows,
    }
    table = markdown(rows, report.unit)
    print(table, end="")
    print(
        "batch: " + " -> ".join(f"{c['batch_size']} (step {c['step']})" for c in run.schedule),
        file=sys.stderr,
    )
    if args.json:
        write_json(args.json, result)
    if args.markdown:
        args.markdown.write_text(table)
    if args.plot:
        fits = [
            goals[(goal.metric, goal.level)] for goal in config.goals if goal.metric == config.goals[0].metric
        ]
        points = [
            None if r["steps"] is None else (r["examples"], r["steps"])
            for r, goal in zip(rows, config.goals, strict=True)
            if goal.metric == config.goals[0].metric
        ]
        plot_pareto_front(
            fits, args.plot, unit=report.unit, extra=points, extra_label=f"adaptive from B = {b0}"
        )
    return result


if __name__ == "__main__":
    main()
