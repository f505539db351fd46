"""Branched training against a batch-size sweep: B_crit at the sweep's loss goals, and what each spent.

Reads a finished ``noisescale sweep`` directory (its ``fit.json``, ``config.json`` and run records),
runs ``noisescale branch`` on the same task with its default branch points (0 and then doubling)
and a reading at each of the sweep's training-loss goals (``--read-at-loss``: the first check of
the base run at or below each, no branches there), once per learning-rate rule of the branches,
and compares, per goal, the branched B_crit from initialisation (``b_crit_cumulative``:
E_min/S_min summed over the segments, the quantity a sweep measures) with the sweep's 95%
interval, and the training examples (and CPU seconds) of both; the local value of every branch
point follows.

    noisescale sweep --task mnist --out runs/sweep-mnist --jobs 2
    python benchmarks/branch_vs_sweep.py --sweep runs/sweep-mnist --out runs/branch-vs-sweep --rules sweep \\
        --json benchmarks/results/branch_vs_sweep.json --markdown benchmarks/results/branch_vs_sweep.md

Rules of the branches' learning rate (``--rules``): ``sweep``, the task's default (eq. 2.6 of
McCandlish et al. 2018 with the sweep rule's ``B_*``: every branch at the sweep's learning rate for
its batch); ``linear``, the paper's SGD rule ``eta kappa`` (``lr_b_star = inf``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from noisescale._format import format_bracket
from noisescale.experiments.branch import BranchConfig, run_branched
from noisescale.experiments.tasks import get_task
from noisescale.io import atomic_write_text, write_json

RULES = {"sweep": {}, "linear": {"lr_b_star": math.inf}}


def sweep_summary(folder: Path) -> dict[str, Any]:
    """The sweep's task, training-loss goals with B_crit and interval, examples and CPU-free wall time."""
    fit = json.loads((folder / "fit.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    goals = [
        {k: g[k] for k in ("goal", "b_crit", "b_crit_ci", "bound", "e_min", "s_min")}
        for g in fit["goals"]
        if g["metric"] == "train_loss"
    ]
    return {
        "task": config["task"],
        "unit": fit["unit"],
        "goals": goals,
        "runs": len(runs),
        "examples": sum(r["examples_run"] for r in runs),
        "wall_time_s": sum(r["wall_time_s"] for r in runs),
    }


def _read(point: dict[str, Any], suffix: str) -> dict[str, Any]:
    """A point's local (``suffix=""``) or cumulative (``"_cumulative"``) B_crit, interval, bound, note."""
    return {
        "b_crit": point[f"b_crit{suffix}"],
        "b_crit_ci": point[f"b_crit{suffix}_ci"],
        "bound": point[f"b_crit{suffix}_bound" if suffix else "bound"],
        "bracket": point.get(f"b_crit{suffix}_bracket") if suffix else None,
        "note": point[f"b_crit{suffix}_note" if suffix else "note"],
    }


def verdict(r: dict[str, Any], ci: list[float] | None) -> tuple[str, float | None]:
    """Whether a branched value lies inside the sweep's interval, and by what factor it misses."""
    if ci is None:
        return "no interval", None
    low, high = ci
    if r["note"]:
        return "undefined", None
    if r["b_crit"] is not None:
        value, mine = r["b_crit"], r["b_crit_ci"] or [r["b_crit"]] * 2
        if low <= value <= high:
            return "inside", 1.0
        overlap = "; intervals overlap" if mine[0] <= high and mine[1] >= low else ""
        side = "above" if value > high else "below"
        return f"{side}{overlap}", (value / high if value > high else low / value)
    if r["bracket"] is not None:  # B_crit in [lo, hi] (hi None: unbounded)
        lo, hi = r["bracket"][0], math.inf if r["bracket"][1] is None else r["bracket"][1]
        if low <= lo and hi <= high:
            return "inside (bounds)", 1.0
        if lo > high or hi < low:
            return ("above", lo / high) if lo > high else ("below", low / hi)
        return "consistent (bounds overlap)", None
    value = float(r["bound"].split()[-1])
    if ">" in r["bound"]:  # B_crit >= value
        return ("above", value / high) if value > high else ("consistent (bound)", None)
    return ("below", low / value) if value < low else ("consistent (bound)", None)


def compare(sweep: dict[str, Any], branched: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per goal: the sweep's B_crit and, per rule, the branched one from initialisation read at the goal."""
    rows = []
    for g in sweep["goals"]:
        row: dict[str, Any] = {
            "goal": g["goal"],
            "sweep_b_crit": g["b_crit"],
            "sweep_ci": g["b_crit_ci"],
            "sweep_e_min": g["e_min"],
            "sweep_s_min": g["s_min"],
        }
        for rule, report in branched.items():
            at_goals = {r["target"]: r for r in report["readings"]}
            if g["goal"] not in at_goals:
                raise SystemExit(f"the base run did not reach the goal {g['goal']}: raise its max_examples")
            reading = at_goals[g["goal"]]
            r = _read(reading, "_cumulative")
            where, factor = verdict(r, g["b_crit_ci"])
            row[rule] = {
                "examples": reading["examples"],
                "loss": reading["loss"],
                "b_simple": reading["b_simple"],
                "cumulative": {**r, "verdict": where, "miss_factor": factor},
            }
            row[rule]["cumulative"].update(
                e_min=reading["e_min_cumulative"], s_min=reading["s_min_cumulative"]
            )
        rows.append(row)
    return rows


def _value(r: dict[str, Any]) -> str:
    if r["note"]:
        return "-"
    if r["bound"] and r["bracket"] is not None:
        return format_bracket(*r["bracket"])
    if r["bound"]:
        return r["bound"].replace("B_crit ", "")
    ci = r["b_crit_ci"]
    return f"{r['b_crit']:.0f}" + ("" if ci is None else f" [{ci[0]:.0f}, {ci[1]:.0f}]")


def _where(r: dict[str, Any]) -> str:
    side, _, rest = r["verdict"].partition(";")
    miss = "" if r["miss_factor"] in (None, 1.0) else f" by {r['miss_factor']:.2g}x"
    return side + miss + (f";{rest}" if rest else "")


def markdown(result: dict[str, Any]) -> str:
    """The comparison and what each spent, as Markdown tables."""
    sweep, rules = result["sweep"], list(result["branched"])
    unit = sweep["unit"]
    head = "| training-loss goal | sweep B_crit [95%] | " + " | ".join(
        f"{r} rule: from init [95%] | inside? | base reached it at" for r in rules
    )
    lines = [head + " |", "|" + "---|" * (2 + 3 * len(rules))]
    for row in result["rows"]:
        ci = row["sweep_ci"]
        cells = [f"{row['goal']:g}", f"{row['sweep_b_crit']:.0f} [{ci[0]:.0f}, {ci[1]:.0f}]"]
        for r in rules:
            b = row[r]
            cells += [
                _value(b["cumulative"]),
                _where(b["cumulative"]),
                f"{b['examples']:,} ({b['loss']:.3f})",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"| E_min, S_min at the goal ({unit}, steps) | sweep | "
        + " | ".join(f"branched, {r} rule" for r in rules)
        + " |"
    )
    lines.append("|" + "---|" * (2 + len(rules)))
    for row in result["rows"]:
        cells = [f"{row['goal']:g}", f"{row['sweep_e_min']:,.0f}, {row['sweep_s_min']:.0f}"]
        for r in rules:
            c = row[r]["cumulative"]
            cells.append("-" if c["e_min"] is None else f"{c['e_min']:,.0f}, {c['s_min']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"| spent ({unit}) | examples | share of the sweep's | CPU s |")
    lines.append("|---|---|---|---|")
    runs = f"sweep ({sweep['runs']} runs)"
    wall = f"({sweep['wall_time_s']:.0f} s wall, runs summed)"
    lines.append(f"| {runs} | {sweep['examples']:,} | 100% | {wall} |")
    for r in rules:
        spent, cpu = result["branched"][r]["examples_spent"], result["branched"][r]["cpu_time_s"]
        share = spent["total"] / sweep["examples"]
        lines.append(f"| branched, {r} rule | {spent['total']:,} | {share:.1%} | {cpu['total']:.0f} |")
    for r in rules:
        lines += ["", f"| {r} rule: branch point ({unit}) | train loss | window | local B_crit [95%] |"]
        lines.append("|---|---|---|---|")
        for p in result["branched"][r]["points"]:
            local = _value(_read(p, "")) if not p["note"] else "no progress at B"
            lines.append(f"| {p['examples']:,} | {p['loss']:.3f} | {p['window']:,} | {local} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, required=True, help="a finished `noisescale sweep` directory")
    parser.add_argument("--out", type=Path, default=Path("runs/branch-vs-sweep"))
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    parser.add_argument("--replicas", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    sweep = sweep_summary(args.sweep)
    task = get_task(sweep["task"])
    branched = {}
    for rule in args.rules:
        start = time.perf_counter()
        config = BranchConfig.for_task(
            task,
            readings=[g["goal"] for g in sweep["goals"]],
            replicas=args.replicas,
            **RULES[rule],
        )
        report = run_branched(config, args.out / rule, task=task).report
        branched[rule] = report
        print(f"{rule}: {time.perf_counter() - start:.0f} s")
    result = {"sweep": sweep, "branched": branched, "rows": compare(sweep, branched)}
    table = markdown(result)
    print(table)
    if args.json is not None:
        write_json(args.json, result)
    if args.markdown is not None:
        atomic_write_text(args.markdown, table)


if __name__ == "__main__":
    main()
