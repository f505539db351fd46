"""``noisescale fit``: the critical batch size of a batch-size sweep you ran yourself.

Usage::

    noisescale fit runs.csv                     # one row per run: batch_size, steps [, goal, metric, reached]
    noisescale fit runs/sweep-digits/results.csv --json   # prints the sweep's own fit.json
    noisescale fit curves.jsonl --goal 3.5 --goal 3.0 --goal 2.8   # batch_size, step, loss [, run, lr]
    noisescale fit runs.csv --json > fit.json   # then: noisescale predict --from fit.json

For every goal it fits ``S(B) = S_min (1 + B_crit/B)`` in log space (McCandlish et al. 2018,
eqs. 2.11-2.12, appendix A.3) with bootstrap intervals, prints a table (or JSON with
``--json``) and writes two plots next to FILE (or into ``--out``): ``<stem>.pareto.png``, the
steps-examples front with the fitted hyperbolas, and ``<stem>.b_crit.png``, B_crit per goal
next to the B_simple logged by the runs (a ``b_simple`` column), one pair per metric. Goals of
different metrics (a ``metric`` column: ``train_loss``, ``test_error``...) are fitted apart, and
``B_crit(L)`` is fitted across the goals of one loss metric only. Batch sizes are in the file's
``unit`` column, else in ``--unit`` (default examples). The JSON is that of
:mod:`noisescale.critical.report`, the schema of a sweep's ``fit.json``: on a sweep's
``results.csv`` with the sweep's ``--bootstrap`` and ``--confidence`` it reproduces that file
exactly. A sweep that does not bracket B_crit gets a bound ("B_crit > 4096"), not a number. Bad
files exit with status 2 and one line saying what is wrong and where.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from noisescale._format import format_batch, format_interval, short_number
from noisescale.cli.common import BootstrapOption, ConfidenceOption, check_writable, fail
from noisescale.critical.plotting import plot_report
from noisescale.critical.predict import BCritPowerLaw
from noisescale.critical.report import FitReport, FitSettings, GoalFit, report_from_file
from noisescale.errors import SweepDataError
from noisescale.io import to_jsonable

__all__ = ["Unit", "fit", "goal_name", "law_sentence", "output_console", "report_notes", "report_table"]


class Unit(str, enum.Enum):
    """What a batch size counts."""

    examples = "examples"
    images = "images"
    tokens = "tokens"
    observations = "observations"


def goal_name(metric: str, goal: float | None) -> str:
    """A goal for people: ``"train loss 0.2"``, ``"test error 0.05"``, ``"loss 3.5"``, ``"goal"``."""
    if goal is None:
        return "goal"
    words = metric.replace("_", " ")
    return f"{words} {goal:.3g}" if metric.endswith("error") else f"{words} {goal:g}"


def law_sentence(law: BCritPowerLaw, unit: str) -> str:
    """``B_crit(L)`` in words, with how much the loss must fall for B_crit to double."""
    head = f"B_crit(L) = B*/L^(1/alpha_B) with B* = {law.b_star:.3g} {unit}, alpha_B = {law.alpha_b:.3g}"
    drop = law.doubling_drop()
    tail = (
        f"B_crit doubles for every {drop:.0%} drop of the loss target"
        if drop < 0.5
        else "B_crit hardly changes across these loss targets"
    )
    return f"{head}: {tail} (Kaplan et al. 2020, eq. 5.3)"


def output_console() -> Console:
    """Console for results: the terminal's width, or 200 columns when piped (the fit table stays whole)."""
    console = Console(highlight=False, soft_wrap=True, markup=False)  # file names may hold brackets
    if not console.is_terminal:
        console.width = 200
    return console


def _b_crit_text(g: GoalFit) -> str:
    f = g.fit
    if f is None:
        return "no fit"
    if f.bracketed:
        return f"{short_number(f.b_crit_fit)} {format_interval(*f.b_crit_ci)}"
    return f"{(f.bound or 'unconstrained').replace('B_crit ', '')} (not bracketed)"


def report_table(report: FitReport, title: str = "critical batch size") -> Table:
    """The table of a report: per goal B_crit [CI] or bound, S_min, E_min, runs, scatter, B_simple."""
    unit = report.unit
    table = Table(title=f"{title} (batch sizes in {unit}, {report.settings.confidence:.0%} intervals)")
    columns = ["goal", "B_crit", "S_min (steps)", f"E_min ({unit})", "runs (censored)", "scatter"]
    has_b = any(g.b_simple is not None for g in report.goals)
    has_p = any(g.b_simple_preconditioned is not None for g in report.goals)
    if has_b:
        columns += ["B_simple, run average (median [range])", "B_simple/B_crit"]
    if has_p:
        columns += ["B_simple preconditioned, run average", "preconditioned/B_crit"]
    for col in columns:
        table.add_column(col, justify="right")
    for g in report.goals:
        f = g.fit
        row = [goal_name(g.metric, g.goal), _b_crit_text(g)]
        if f is None:
            row += ["", "", str(len(g.points)), ""]
        else:
            row += [
                f"{short_number(f.s_min)} {format_interval(*f.s_min_ci)}",
                f"{short_number(f.e_min)} {format_interval(*f.e_min_ci)}",
                f"{f.n_points} ({f.n_censored})",
                f"{f.residual_sd:.1%}",
            ]
        pairs = ((has_b, g.b_simple, g.ratio), (has_p, g.b_simple_preconditioned, g.ratio_preconditioned))
        for shown, bs, ratio in pairs:
            if shown:
                median = "-" if bs is None else short_number(bs.median)
                row.append(median if bs is None else f"{median} {format_interval(bs.min, bs.max)}")
                row.append("-" if ratio is None else f"{ratio:.2g}")
        table.add_row(*row)
    return table


def report_notes(report: FitReport) -> list[str]:
    """Goals without a fit or bracket, censored batch sizes, and B_crit(L) across the loss goals."""
    lines = []
    for g in report.goals:
        name, f = goal_name(g.metric, g.goal), g.fit
        if f is None:
            lines.append(f"{name}: {g.error}")
            continue
        lo, hi = (format_batch(v) for v in f.batch_range)
        if not f.bracketed and f.bound:
            side = "larger" if ">" in f.bound else "smaller"
            lines.append(
                f"{name}: the sweep ({lo} to {hi}) does not bracket B_crit: {f.bound} "
                f"({f.confidence:.0%} one-sided); add {side} batch sizes"
            )
        elif not f.bracketed:
            lines.append(f"{name}: these runs do not constrain B_crit; add batch sizes and repeat runs")
        if f.n_censored:
            lines.append(
                f"{name}: {f.n_censored} batch size(s) did not reach the goal; "
                "their steps count as lower bounds"
            )
    if report.power_law is not None:
        lines.append(f"across {report.power_law_metric} goals: {law_sentence(report.power_law, report.unit)}")
    return lines


def fit(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV or JSON Lines: batch_size,steps[,goal,metric,reached] or batch_size,step,loss[,run,lr]."
        ),
    ],
    goal: Annotated[
        list[float] | None,
        typer.Option("--goal", help="Loss target (repeat for several); required for loss curves."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON object instead of a table.")
    ] = False,
    unit: Annotated[
        Unit | None,
        typer.Option(help="What a batch size counts (default: the file's unit column, else examples)."),
    ] = None,
    bootstrap: BootstrapOption = 1000,
    confidence: ConfidenceOption = 0.95,
    max_increase: Annotated[
        float,
        typer.Option(
            help="Tolerated rise of steps with batch size (ratio >= 1) before data count as non-monotone.",
            min=1.0,
        ),
    ] = 1.5,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.", min=0)] = 0,
    plots: Annotated[bool, typer.Option(help="Write the Pareto-front and B_crit plots.")] = True,
    out: Annotated[Path | None, typer.Option(help="Folder for the plots (default: next to FILE).")] = None,
) -> None:
    """Fit the critical batch size B_crit, S_min and E_min of your own batch-size sweep.

    Example: noisescale fit curves.csv --goal 3.5 --goal 3.0 --json
    """
    folder = out if out is not None else file.parent
    settings = FitSettings(n_bootstrap=bootstrap, confidence=confidence, max_increase=max_increase, seed=seed)
    try:
        report = report_from_file(file, goal, unit=None if unit is None else unit.value, settings=settings)
        if plots:
            check_writable(folder)
    except (SweepDataError, ValueError) as exc:
        raise fail(str(exc)) from None
    if all(g.fit is None for g in report.goals):
        raise fail(f"{file}: " + "; ".join(report_notes(report)))
    written = plot_report(report, folder, f"{file.stem}.") if plots else []
    if json_output:
        typer.echo(json.dumps(to_jsonable(report.to_json()), indent=2, allow_nan=False))
    else:
        console = output_console()
        console.print(report_table(report))
        for line in report_notes(report):
            console.print(line)
    if written:
        Console(stderr=True, highlight=False, markup=False).print("wrote " + ", ".join(map(str, written)))
