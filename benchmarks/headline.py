"""The headline figure: the measured B_crit against the run-averaged B_simple of every built-in task.

McCandlish et al. (2018) and OpenAI's post "How AI Training Scales" claim that one statistic, the
noise scale, predicts how far training parallelises, across domains. This script gathers, from
FINISHED sweep directories of ``noisescale sweep``, each task's B_crit with its interval and the
B_simple averaged over the same runs, and draws B_crit against B_simple on log-log axes with the
line B_crit = B_simple and the paper's Table 1 as reference points::

    python benchmarks/headline.py runs/sweep-linreg runs/sweep-digits runs/sweep-mnist \\
        runs/sweep-fashion-mnist runs/sweep-cartpole --out docs/img/b_crit_vs_b_simple.png

It prints the table (task, unit, B_simple, B_crit, ratio, the paper's value, the sweep's time) in
Markdown. Built-in tasks without a sweep directory are listed as missing. A directory whose sweep
is not finished (runs still planned, or no ``fit.json``) is refused, naming what to run.

Per task one goal stands in the table: the hardest goal of the sweep's first metric whose B_crit
is bracketed (else the hardest with a bound); the figure shows every goal. B_simple is the median
over the batch sizes of the run-averaged B_simple to the goal (``fit.json``), with its range;
for ``cartpole`` that of the whole A2C loss, the policy group's where resolved in the note.
A sweep's time is the sum of its runs' wall times (one thread each) halved, as with ``--jobs 2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from matplotlib.figure import Figure

from noisescale._format import format_batch
from noisescale.critical.goals import run_mean
from noisescale.experiments.rl import RL_TASK_NAMES
from noisescale.experiments.sweep import SweepConfig, load_records, plan_next
from noisescale.experiments.tasks import TASK_NAMES
from noisescale.io import save_figure

TASKS = TASK_NAMES + RL_TASK_NAMES

# McCandlish et al. (2018), Table 1 (run averages): name, B_crit, B_simple, unit; ranges as (low, high).
PAPER: list[tuple[str, tuple[float, float], tuple[float, float], str]] = [
    ("MNIST", (200, 200), (900, 900), "images"),
    ("SVHN", (500, 500), (4_000, 4_000), "images"),
    ("CIFAR10", (900, 900), (2_000, 2_000), "images"),
    ("ImageNet", (15_000, 15_000), (30_000, 30_000), "images"),
    ("SVHN autoencoder", (40, 40), (2, 2), "images"),
    ("VAE", (200, 200), (10, 10), "images"),
    ("Billion Word LSTM", (100_000, 100_000), (150_000, 150_000), "tokens"),
    ("Atari (7 games)", (400, 8_000), (1_000, 20_000), "observations"),
    ("Dota 5v5", (8e6, 8e6), (2.4e7, 2.4e7), "observations"),  # B_crit > 8x10^6: a lower bound
]
# The paper's task closest to each of ours (None: nothing like it in Table 1).
PAPER_FOR = {
    "mnist": "MNIST: B_crit 200, B_simple 900 images",
    "fashion-mnist": "none (MNIST: 200 / 900 images)",
    "digits": "none (MNIST: 200 / 900 images)",
    "linreg": "none",
    "shakespeare": "Billion Word LSTM: 100,000 / 150,000 tokens",
    "cartpole": "Atari: 400-8,000 / 1,000-20,000 observations",
}


class GoalPoint(NamedTuple):
    """One goal of one task's sweep."""

    task: str
    unit: str
    metric: str
    goal: float
    b_crit: float | None  # None when only a bound is known
    b_crit_ci: tuple[float | None, float | None]  # a bound: (value, None) for ">", (None, value) for "<"
    bound: str | None
    b_simple: float | None  # median over the batch sizes of the run-averaged B_simple to the goal
    b_simple_range: tuple[float, float] | None
    fitted: bool  # False: too few batch sizes reached the goal to fit it ("error" in fit.json)


class TaskSweep(NamedTuple):
    """A finished sweep directory: its goals, its cost, and (RL) the policy group's B_simple."""

    task: str
    path: Path
    goals: list[GoalPoint]
    runs: int
    run_seconds: float  # sum of the runs' wall times (one thread each)
    policy_b_simple: dict[float, float]  # RL: per goal level, the policy group's B_simple as fit.json's


def load_sweep_dir(path: Path) -> TaskSweep:
    """Read a finished sweep directory.

    Raises:
        ValueError: if it is not a sweep directory, or the sweep is not finished (the message says
            what to run).
    """
    try:
        saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a directory of `noisescale sweep` (config.json: {exc})") from None
    config = SweepConfig.from_dict(saved)
    records = load_records(path, config)
    todo = plan_next(config, records)
    if todo or not (path / "fit.json").is_file():
        what = f"{len(todo)} runs still planned" if todo else "no fit.json"
        raise ValueError(
            f"{path}: the {config.task} sweep is not finished ({what}): run `noisescale sweep --task "
            f"{config.task} --out {path}` with its settings (config.json) to finish it"
        )
    fit = json.loads((path / "fit.json").read_text(encoding="utf-8"))
    goals = [_goal_point(config.task, fit["unit"], g) for g in fit["goals"]]
    policy = _policy_b_simple(path, records) if config.task in RL_TASK_NAMES else {}
    seconds = sum(r.wall_time_s for r in records.values())
    return TaskSweep(config.task, path, goals, len(records), seconds, policy)


def _policy_b_simple(path: Path, records: dict[Any, Any]) -> dict[float, float]:
    """Per goal, the median over the batch sizes of the policy group's run-averaged B_simple.

    The same runs and steps as the total's in ``fit.json``: for each row of ``results.csv`` that
    reached its goal, the step-weighted mean of the policy's resolved values up to the crossing.
    """
    by_name = {r.name: r for r in records.values()}
    per_goal: dict[float, list[float]] = {}
    for row in pd.read_csv(path / "results.csv").itertuples():
        run = by_name.get(str(row.run))
        if not row.reached or run is None:
            continue
        values = [(p.groups or {}).get("policy") for p in run.curve]
        mean = run_mean([p.step for p in run.curve], values, float(row.steps))
        if mean is not None:
            per_goal.setdefault(float(row.goal), []).append(mean)
    return {goal: statistics.median(v) for goal, v in per_goal.items()}


def _goal_point(task: str, unit: str, g: dict[str, Any]) -> GoalPoint:
    ci = g.get("b_crit_ci") or [None, None]
    bs = g.get("b_simple")
    return GoalPoint(
        task=task,
        unit=unit,
        metric=g["metric"],
        goal=g["goal"],
        b_crit=g.get("b_crit"),
        b_crit_ci=(ci[0], ci[1]),
        bound=g.get("bound"),
        b_simple=None if bs is None else bs["median"],
        b_simple_range=None if bs is None else (bs["min"], bs["max"]),
        fitted="error" not in g,
    )


def headline_goal(sweep: TaskSweep) -> GoalPoint | None:
    """The task's goal: the hardest of the first metric with a B_crit, else with a bound, else any."""
    first = [g for g in sweep.goals if g.metric == sweep.goals[0].metric] if sweep.goals else []
    fitted = [g for g in first if g.b_crit is not None]
    bounded = [g for g in first if g.bound is not None]
    return (fitted or bounded or first or [None])[-1]


def _goal_text(g: GoalPoint) -> str:
    words = g.metric.replace("_", " ")
    return f"{words} {g.goal:.3g}" if g.metric.endswith("error") else f"{words} {g.goal:g}"


def _num(x: float | None) -> str:
    return "–" if x is None else format_batch(x)


def markdown_table(sweeps: dict[str, TaskSweep]) -> str:
    """The README's table: one row per built-in task, missing ones included."""
    lines = [
        "| task | unit | goal | B_simple, run average [range] | B_crit [95% CI] | B_simple / B_crit "
        "| McCandlish et al. (2018), Table 1 | sweep time (2 cores) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        sweep = sweeps.get(task)
        g = None if sweep is None else headline_goal(sweep)
        if sweep is None or g is None:
            why = "no finished sweep" if sweep is None else "no goal"
            lines.append(f"| {task} | | {why} | | | | {PAPER_FOR[task]} | |")
            continue
        low, high = g.b_simple_range or (None, None)
        b_simple = _num(g.b_simple) + ("" if low is None else f" [{_num(low)}, {_num(high)}]")
        if g.goal in sweep.policy_b_simple:
            b_simple += f"; policy group {_num(sweep.policy_b_simple[g.goal])}"
        if g.b_crit is not None:
            b_crit = f"{_num(g.b_crit)} [{_num(g.b_crit_ci[0])}, {_num(g.b_crit_ci[1])}]"
            ratio = "–" if g.b_simple is None else f"{g.b_simple / g.b_crit:.2g}"
            if g.goal in sweep.policy_b_simple:
                ratio += f"; policy {sweep.policy_b_simple[g.goal] / g.b_crit:.2g}"
        else:
            b_crit = g.bound or ("not constrained by the grid" if g.fitted else "no fit: too few batch sizes")
            ratio = "–"
        half = sweep.run_seconds / 2  # two runs at a time
        took = f"{half:.0f} s" if half < 120 else f"{half / 60:.1f} min"
        lines.append(
            f"| {task} | {g.unit} | {_goal_text(g)} | {b_simple} | {b_crit} | {ratio} | {PAPER_FOR[task]} "
            f"| {took} ({sweep.runs} runs) |"
        )
    return "\n".join(lines)


def plot(sweeps: dict[str, TaskSweep], path: Path) -> None:
    """B_crit against B_simple, log-log, every goal of every sweep, the paper's Table 1 in grey."""
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax = fig.add_subplot()
    for name, (crit, simple, _) in zip([p[0] for p in PAPER], [p[1:] for p in PAPER], strict=True):
        x, y = statistics.geometric_mean(simple), statistics.geometric_mean(crit)
        xerr = [[max(0.0, x - simple[0])], [max(0.0, simple[1] - x)]]  # a range, or none (rounding)
        yerr = [[max(0.0, y - crit[0])], [max(0.0, crit[1] - y)]]
        ax.errorbar(
            x, y, xerr=xerr, yerr=yerr,
            fmt="s", color="0.6", markersize=5, capsize=0, lolims=name.startswith("Dota"),
        )  # fmt: skip
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7, color="0.45")
    for i, (task, sweep) in enumerate(sweeps.items()):
        color = f"C{i}"
        for j, g in enumerate(p for p in sweep.goals if p.b_simple is not None):
            lo, hi = g.b_crit_ci
            y = g.b_crit if g.b_crit is not None else (lo if lo is not None else hi)
            if y is None or g.b_simple is None:
                continue
            assert g.b_simple_range is not None
            xerr = [[g.b_simple - g.b_simple_range[0]], [g.b_simple_range[1] - g.b_simple]]
            yerr = None if g.b_crit is None or lo is None or hi is None else [[y - lo], [hi - y]]
            label = f"{task} ({g.unit})" if j == 0 else None
            bound = g.b_crit is None
            limits = {"lolims": bound and lo is not None, "uplims": bound and hi is not None}
            ax.errorbar(
                g.b_simple, y, xerr=xerr, yerr=yerr, fmt="o", color=color, markersize=6, capsize=2,
                label=label, **limits,
            )  # fmt: skip
            if g.goal in sweep.policy_b_simple:  # RL: the policy group alone, hollow
                label = f"{task}, policy group" if j == 0 else None
                x = sweep.policy_b_simple[g.goal]
                style = {"fmt": "o", "mfc": "none", "color": color, "markersize": 7}
                ax.errorbar(x, y, yerr=yerr, label=label, **style, **limits)
    lims = [0.5, 1e8]
    ax.plot(lims, lims, "k--", linewidth=1, label="B_crit = B_simple")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*lims)
    ax.set_ylim(*lims)
    ax.set_xlabel("B_simple, run average (the task's unit)")
    ax.set_ylabel("B_crit, measured by a batch-size sweep")
    ax.set_title("Critical batch size against the noise scale (grey: McCandlish et al. 2018, Table 1)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="*", type=Path, help="finished sweep directories, one per task")
    default = Path("docs/img/b_crit_vs_b_simple.png")
    parser.add_argument("--out", type=Path, default=default, help="the figure")
    args = parser.parse_args(argv)
    sweeps: dict[str, TaskSweep] = {}
    try:
        for path in args.sweeps:
            sweep = load_sweep_dir(path)
            if sweep.task in sweeps:
                first = sweeps[sweep.task].path
                raise ValueError(f"two sweeps of {sweep.task}: {first} and {path}; give one")
            sweeps[sweep.task] = sweep
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ordered = {t: sweeps[t] for t in TASKS if t in sweeps}
    plot(ordered, args.out)
    print(markdown_table(ordered))
    missing = [t for t in TASKS if t not in sweeps]
    if missing:
        print(f"\nmissing (no finished sweep given): {', '.join(missing)}")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
