"""``noisescale fit``: the critical batch size of a batch-size sweep you ran yourself.

Usage::

    noisescale fit runs.csv                     # one row per run: batch_size, steps [, goal, reached]
    noisescale fit curves.jsonl --goal 3.5 --goal 3.0 --goal 2.8   # batch_size, step, loss [, run, lr]
    noisescale fit runs.csv --json > fit.json   # then: noisescale predict --from fit.json

For every goal it fits ``S(B) = S_min (1 + B_crit/B)`` in log space (McCandlish et al. 2018,
eqs. 2.11-2.12, appendix A.3) with bootstrap intervals, prints a table (or JSON with
``--json``) and writes two plots next to FILE (or into ``--out``): ``<stem>.pareto.png``, the
steps-examples front with the fitted hyperbolas, and ``<stem>.b_crit.png``, B_crit per goal
next to the B_simple logged by the runs (a ``b_simple`` column). A sweep that does not bracket
B_crit gets a bound ("B_crit > 4096"), not a number. Bad files exit with status 2 and one line
saying what is wrong and where.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from noisescale.cli.common import BootstrapOption, ConfidenceOption, check_writable, fail
from noisescale.critical import format_batch
from noisescale.errors import SweepDataError
from noisescale.io import to_jsonable
from noisescale.plotting_critical import plot_b_crit_by_goal, plot_pareto_front
from noisescale.predict import BCritPowerLaw, fit_b_crit_power_law
from noisescale.sweepdata import GoalFit, b_simple_by_goal, fit_sweep, load_sweep

__all__ = ["Unit", "fit", "fit_json", "law_sentence", "output_console", "power_law_of", "short_number"]


class Unit(str, enum.Enum):
    """What a batch size counts."""

    examples = "examples"
    tokens = "tokens"


def power_law_of(goal_fits: list[GoalFit]) -> tuple[BCritPowerLaw | None, str | None]:
    """``B_crit(L)`` across the bracketed goals (Kaplan et al. 2020, eq. 5.3), or why there is none."""
    pairs = [(g.goal, g.fit.b_crit) for g in goal_fits if g.fit and g.fit.b_crit and g.goal and g.goal > 0]
    if len(goal_fits) < 2:
        return None, None
    try:
        return fit_b_crit_power_law([p[0] for p in pairs], [p[1] for p in pairs]), None
    except SweepDataError as exc:
        return None, str(exc)


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
    """Console for results: the terminal's width, or 140 columns when piped (tables stay unwrapped)."""
    console = Console(highlight=False, soft_wrap=True, markup=False)  # file names may hold brackets
    if not console.is_terminal:
        console.width = 140
    return console


def _goal_json(g: GoalFit, b_simple: dict) -> dict[str, Any]:
    if g.fit is None:
        return {"goal": g.goal, "error": g.error}
    med = b_simple.get(g.goal)
    bs = None if med is None else {"median": med[0], "min": med[1], "max": med[2]}
    return {"goal": g.goal, **g.fit.to_dict(), "b_simple": bs}


def fit_json(
    goal_fits: list[GoalFit], *, unit: str, b_simple: dict | None = None, plots: list[Path] | None = None
) -> dict[str, Any]:
    """The ``--json`` object: flat for one goal, ``{"goals": [...], "power_law": ...}`` for several.

    Args:
        goal_fits: results of :func:`noisescale.sweepdata.fit_sweep`.
        unit: batch-size unit ("examples" or "tokens").
        b_simple: ``{goal: (median, min, max)}`` of B_simple logged by the runs.
        plots: paths of the plots written.

    Returns:
        A JSON-ready dict (non-finite floats still to be mapped by ``to_jsonable``).
    """
    b_simple = b_simple or {}
    extra = {"unit": unit, "plots": [str(p) for p in plots or []]}
    if len(goal_fits) == 1:
        return {**_goal_json(goal_fits[0], b_simple), **extra}
    law, why = power_law_of(goal_fits)
    power = None if law is None else {"b_star": law.b_star, "alpha_b": law.alpha_b}
    return {
        "goals": [_goal_json(g, b_simple) for g in goal_fits],
        "power_law": power,
        "power_law_note": why,
        **extra,
    }


def short_number(value: float) -> str:
    """Three significant figures with a k/M/G/T suffix: ``549000 -> '549k'``, ``2.84e6 -> '2.84M'``."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale * 0.9995:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _ci(lo: float, hi: float) -> str:
    return f"[{short_number(lo)}, {short_number(hi)}]"


def _table(goal_fits: list[GoalFit], unit: str, b_simple: dict, confidence: float) -> Table:
    table = Table(title=f"critical batch size (batch sizes in {unit}, {confidence:.0%} intervals)")
    for col in ("goal", "B_crit", "S_min (steps)", f"E_min ({unit})", "runs (censored)", "scatter"):
        table.add_column(col, justify="right")
    if b_simple:
        table.add_column("B_simple (runs)", justify="right")
    for g in goal_fits:
        name = "-" if g.goal is None else f"{g.goal:g}"
        f = g.fit
        if f is None:
            table.add_row(name, "no fit", "", "", str(len(g.points)), "", *([""] if b_simple else []))
            continue
        if f.bracketed:
            b_text = f"{short_number(f.b_crit_fit)} {_ci(*f.b_crit_ci)}"
        else:
            b_text = f"{(f.bound or 'unconstrained').replace('B_crit ', '')} (not bracketed)"
        row = [
            name,
            b_text,
            f"{short_number(f.s_min)} {_ci(*f.s_min_ci)}",
            f"{short_number(f.e_min)} {_ci(*f.e_min_ci)}",
            f"{f.n_points} ({f.n_censored})",
            f"{f.residual_sd:.1%}",
        ]
        if b_simple:
            med = b_simple.get(g.goal)
            row.append("-" if med is None else f"{short_number(med[0])} {_ci(med[1], med[2])}")
        table.add_row(*row)
    return table


def _notes(goal_fits: list[GoalFit]) -> list[str]:
    lines = []
    for g in goal_fits:
        name = "goal" if g.goal is None else f"goal {g.goal:g}"
        f = g.fit
        if f is None:
            lines.append(f"{name}: {g.error}")
            continue
        lo, hi = (format_batch(v) for v in f.batch_range)
        if not f.bracketed and f.bound and ">" in f.bound:
            lines.append(
                f"{name}: the sweep ({lo} to {hi}) does not bracket B_crit: {f.bound} "
                f"({f.confidence:.0%} one-sided); add larger batch sizes"
            )
        elif not f.bracketed and f.bound:
            lines.append(
                f"{name}: the sweep ({lo} to {hi}) does not bracket B_crit: {f.bound} "
                f"({f.confidence:.0%} one-sided); add smaller batch sizes"
            )
        elif not f.bracketed:
            lines.append(f"{name}: these runs do not constrain B_crit; add batch sizes and repeat runs")
        if f.n_censored:
            lines.append(
                f"{name}: {f.n_censored} run(s) did not reach the goal; their steps count as lower bounds"
            )
    return lines


def fit(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV or JSON Lines: batch_size,steps[,goal,reached] or batch_size,step,loss[,run,lr]."
        ),
    ],
    goal: Annotated[
        list[float] | None,
        typer.Option("--goal", help="Loss target (repeat for several); required for loss curves."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON object instead of a table.")
    ] = False,
    unit: Annotated[Unit, typer.Option(help="What a batch size counts.")] = Unit.examples,
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
    try:
        table = load_sweep(file, goal)
        if plots:
            check_writable(folder)
        goal_fits = fit_sweep(
            table, n_bootstrap=bootstrap, confidence=confidence, max_increase=max_increase, seed=seed
        )
    except (SweepDataError, ValueError) as exc:
        raise fail(str(exc)) from None
    if all(g.fit is None for g in goal_fits):
        msg = "; ".join(_notes(goal_fits))
        raise fail(f"{file}: {msg}")
    b_simple = b_simple_by_goal(table)
    law, _ = power_law_of(goal_fits)
    written: list[Path] = []
    if plots:
        written.append(plot_pareto_front(goal_fits, folder / f"{file.stem}.pareto.png", unit=unit.value))
        written.append(
            plot_b_crit_by_goal(
                goal_fits,
                folder / f"{file.stem}.b_crit.png",
                b_simple=b_simple,
                power_law=law,
                unit=unit.value,
            )
        )
    if json_output:
        obj = fit_json(goal_fits, unit=unit.value, b_simple=b_simple, plots=written)
        typer.echo(json.dumps(to_jsonable(obj), indent=2, allow_nan=False))
        return
    console = output_console()
    console.print(_table(goal_fits, unit.value, b_simple, confidence))
    for line in _notes(goal_fits):
        console.print(line)
    if law is not None:
        console.print(f"across goals: {law_sentence(law, unit.value)}")
    if written:
        Console(stderr=True, highlight=False, markup=False).print("wrote " + ", ".join(map(str, written)))
