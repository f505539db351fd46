"""``noisescale branch``: B_crit along a run of a built-in task, measured by branched training.

Usage::

    noisescale branch --task digits                        # about 5 s of CPU
    noisescale branch --task mnist --out runs/branch-mnist # about a minute of CPU
    noisescale branch --task mnist --at-loss 0.4 --at-loss 0.2 --at-loss 0.1 --json
    noisescale branch --task mnist --read-at-loss 0.4 --read-at-loss 0.2   # B_crit from init there

A base run trains at batch size ``B``; at each branch point (``--at`` examples seen, by default
0 and then doubling; ``--at-loss`` adds the first check at or below a training loss) copies
branch off at ``kappa B`` (``--kappa``, default 1 2 4 ... 32) with the learning rate times
``((1 + B_*/B)/(1 + B_*/(kappa B)))^p`` (``--lr-power`` p: 1 for SGD, 0.5 for Adam;
``--lr-b-star``: the built-in SGD tasks use their sweep rule's, so that every branch runs at the
sweep's learning rate for its batch; ``inf`` gives the paper's ``kappa^p``), train a window of
examples (``--window-ratio`` times the examples seen, at least ``--window``) each
(``--replicas`` times with other data) and are compared at equal examples.
B_crit at the point is the largest ``kappa B`` that keeps up with every smaller one
(Merrill et al. 2025): by default, that needs at most
``1 + --tolerance`` times their examples to reach the same smoothed loss (tolerance 1: twice,
the definition of B_crit, McCandlish et al. 2018); ``--tolerance-kind loss`` uses the paper's
rule instead (final smoothed loss at most ``--tolerance`` above, the paper's 0.01). That value is
local; ``B_crit from init`` sums eq. 2.11 over the segments between the points, ``E_min/S_min``
from initialisation to the point, the quantity a sweep measures
(:func:`noisescale.critical.branched.cumulative_chain`); ``--read-at-loss`` reads it where the base
run first reaches a loss (a sweep's goal) without branching there.

Prints a table (or ``--json``: ``branch.json``) and writes into ``OUT`` (default
``runs/branch-<task>``): ``config.json``, the base run's checkpoints and ``base.json``, one
record per branch in ``branches/``, ``branch.json`` and ``branch.png`` (B_crit and B_simple
along training). Re-running the same command resumes: finished branches are kept; other
settings into the same ``OUT`` are refused.
"""

from __future__ import annotations

import enum
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from noisescale._format import format_batch, format_bracket, format_interval, short_number
from noisescale.cli.common import DEFAULT_TASK, ConfidenceOption, TaskName, check_writable, fail
from noisescale.cli.fit import output_console
from noisescale.critical.fit import MIN_BOOTSTRAP
from noisescale.errors import DatasetNotFoundError, NoiseScaleError
from noisescale.experiments.branch import BranchConfig, BranchRecord, BranchResult, run_branched
from noisescale.experiments.tasks import get_task
from noisescale.io import to_jsonable

__all__ = ["branch", "branch_table"]


class ToleranceKind(str, enum.Enum):
    """``--tolerance-kind``: :data:`noisescale.critical.branched.TOLERANCE_KINDS`."""

    examples = "examples"
    loss = "loss"


def _b_crit_text(point: dict[str, Any], suffix: str = "") -> str:
    """The local B_crit (``suffix=""``) or the cumulative one (``"_cumulative"``) of a point."""
    if point[f"b_crit{suffix}_note" if suffix else "note"]:
        return "-" if suffix else "no progress at B"
    bound = point[f"b_crit{suffix}_bound" if suffix else "bound"]
    if bound:
        bracket = point.get(f"b_crit{suffix}_bracket") if suffix else None
        if bracket is None:
            return bound.replace("B_crit ", "")
        return format_bracket(*bracket)
    ci = point[f"b_crit{suffix}_ci"]
    text = format_batch(point[f"b_crit{suffix}"])
    return text if ci is None else f"{text} {format_interval(*ci)}"


def branch_table(report: dict[str, Any]) -> Table:
    """Per branch point: examples, loss, B_simple, B_crit (local, from init), each branch against the base."""
    unit, s = report["unit"], report["settings"]
    kind = s["tolerance_kind"]
    what = "examples ratio" if kind == "examples" else "loss excess"
    table = Table(
        title=f"branched critical batch size: {report['task']} (batch sizes in {unit}; base B = "
        f"{s['batch_size']}, lr {s['lr']:g}; {s['confidence']:.0%} intervals over {s['replicas']} replicas)",
        caption=f"B_crit: over the window after the point; from init: E_min/S_min up to the point "
        f"(comparable with a sweep); per branch: {what} against B (x: fails against a smaller branch)",
    )
    for col in (f"{unit} seen", "train loss", "B_simple", "B_crit", "B_crit from init"):
        table.add_column(col, justify="right")
    for kappa in s["kappas"][1:]:
        table.add_column(f"{kappa * s['batch_size']}", justify="right")
    key = "examples_ratio" if kind == "examples" else "excess_loss"
    for p in report["points"]:
        bs, ci = p["b_simple"], p["b_simple_ci"]
        row = [
            short_number(p["examples"]),
            "-" if p["loss"] is None else f"{p['loss']:.4g}",
            "-" if bs is None else f"{short_number(bs)} {format_interval(*ci) if ci else ''}".strip(),
            _b_crit_text(p),
            _b_crit_text(p, "_cumulative"),
        ]
        for b in p["branches"][1:]:
            value = b[key]
            text = "diverged" if value is None else f"{value:.2f}" if kind == "examples" else f"{value:+.3g}"
            row.append(text if b["keeps_up"] else f"{text} x")
        table.add_row(*row)
    return table


def branch(
    task: Annotated[TaskName, typer.Option(help="Built-in task.")] = DEFAULT_TASK,
    out: Annotated[Path | None, typer.Option(help="Output directory (default runs/branch-<task>).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Base batch size B, in the task's unit.", min=1)
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Base learning rate (default: the task's sweep rule at B).")
    ] = None,
    kappa: Annotated[
        list[int] | None, typer.Option("--kappa", help="Multiplier of B, increasing from 1 (repeat).")
    ] = None,
    at: Annotated[
        list[int] | None, typer.Option("--at", help="Branch at these examples seen (repeat).")
    ] = None,
    at_loss: Annotated[
        list[float] | None,
        typer.Option("--at-loss", help="Also branch where the training loss first reaches this (repeat)."),
    ] = None,
    read_at_loss: Annotated[
        list[float] | None,
        typer.Option(
            "--read-at-loss",
            help="Report B_crit from init where the training loss first reaches this, no branches (repeat).",
        ),
    ] = None,
    window: Annotated[
        int | None, typer.Option(help="Examples each branch trains (the least, with --window-ratio).")
    ] = None,
    window_ratio: Annotated[
        float | None,
        typer.Option(help="A point at x examples trains its branches window-ratio * x (0: fixed)."),
    ] = None,
    checks: Annotated[int | None, typer.Option(help="Evaluations per window.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Data streams per branch point (interval).")] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="tau (examples ratio <= 1 + tau) or epsilon (loss).")
    ] = None,
    tolerance_kind: Annotated[
        ToleranceKind, typer.Option(help="What the tolerance bounds.")
    ] = ToleranceKind.examples,
    lr_power: Annotated[
        float | None, typer.Option(help="Branch lr = lr * kappa^p (1 SGD, 0.5 Adam).")
    ] = None,
    lr_b_star: Annotated[
        float | None,
        typer.Option(help="B_* of the branch lr, eq. 2.6 (default: the sweep rule's; inf: lr * kappa^p)."),
    ] = None,
    smoothing: Annotated[
        float | None, typer.Option(help="EMA weight of the newest check, in (0, 1].")
    ] = None,
    max_examples: Annotated[int | None, typer.Option(help="Budget of the base run, examples.")] = None,
    seed: Annotated[
        int, typer.Option(help="Weights and data of the base run; branch streams derive from it.")
    ] = 0,
    threads: Annotated[
        int, typer.Option(help="torch threads (results are deterministic per count).", min=1)
    ] = 1,
    bootstrap: Annotated[int, typer.Option(help="Replica resamples per point.", min=MIN_BOOTSTRAP)] = 1000,
    confidence: ConfidenceOption = 0.95,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print branch.json instead of a table.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
) -> None:
    """Measure B_crit along training by branched training (Merrill et al. 2025), next to B_simple.

    Example: noisescale branch --task mnist --out runs/branch-mnist
    """
    start = time.perf_counter()
    try:
        the_task = get_task(task.value)
    except DatasetNotFoundError as exc:
        raise fail(str(exc), 1) from None
    try:
        config = BranchConfig.for_task(
            the_task,
            batch_size=batch_size,
            lr=lr,
            kappas=kappa or None,
            points=at or None,
            loss_points=at_loss or None,
            readings=read_at_loss or None,
            window=window,
            window_ratio=window_ratio,
            checks=checks,
            replicas=replicas,
            tolerance=tolerance,
            tolerance_kind=tolerance_kind.value,
            lr_power=lr_power,
            lr_b_star=lr_b_star,
            smoothing=smoothing,
            max_examples=max_examples,
            seed=seed,
            threads=threads,
        )
        folder = out if out is not None else Path("runs") / f"branch-{config.task}"
        check_writable(folder)
    except (NoiseScaleError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    result = _run(config, folder, the_task, bootstrap, confidence, progress)
    report = result.report
    if json_output:
        typer.echo(json.dumps(to_jsonable(report), indent=2, allow_nan=False))
    else:
        console = output_console()
        console.print(branch_table(report))
        for p in report["points"]:
            if p["note"]:
                console.print(f"at {short_number(p['examples'])} {report['unit']}: {p['note']}")
        for r in report["readings"]:
            console.print(
                f"B_crit from init at the loss {r['target']:g} (reached at {short_number(r['examples'])} "
                f"{report['unit']}, loss {r['loss']:.4g}): "
                f"{r['b_crit_cumulative_note'] or _b_crit_text(r, '_cumulative')}"
            )
        for level in report["unreached"]:
            console.print(
                f"the base run did not reach the loss {level:g} within {config.max_examples} examples"
            )
    spent, cpu, unit = report["examples_spent"], report["cpu_time_s"], report["unit"]
    files = ", ".join(p.name for p in result.files)
    Console(stderr=True, highlight=False, markup=False).print(
        f"spent {short_number(spent['total'])} {unit} (base {short_number(spent['base'])}, branches "
        f"{short_number(spent['branches'])}); {result.trained} branches trained now, {cpu['total']:.0f} s "
        f"of CPU in all, {time.perf_counter() - start:.0f} s; wrote {files} in {folder}"
    )


def _run(
    config: BranchConfig, folder: Path, task: Any, bootstrap: int, confidence: float, show: bool
) -> BranchResult:
    """Run with a progress bar over the branches; errors become one line and an exit code."""
    err = Console(stderr=True, highlight=False)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=not show, transient=True) as bar:
        bar_id = bar.add_task("base run", total=None)

        def on_plan(n: int) -> None:
            bar.update(bar_id, total=n, completed=0, description="branches")

        def on_record(record: BranchRecord) -> None:
            bar.advance(bar_id)

        try:
            return run_branched(
                config,
                folder,
                task=task,
                confidence=confidence,
                n_bootstrap=bootstrap,
                on_plan=on_plan,
                on_record=on_record,
            )
        except KeyboardInterrupt:
            msg = f"interrupted: finished branches are saved in {folder}; re-run the same command to resume"
            raise fail(msg, 130) from None
        except NoiseScaleError as exc:
            raise fail(str(exc), 2) from None
