"""``noisescale predict``: steps, examples and speed-up at any batch size from B_crit.

Usage::

    noisescale predict --b-crit 835 --s-min 1200 --batch-size 512 --batch-size 1024
    noisescale predict --b-crit 835 --exchange-rate 4000          # cheapest batch for E + r S
    noisescale predict --from fit.json                            # output of `noisescale fit --json`
    noisescale predict --from curves.csv --goal 3.0 --goal 2.8 --loss 2.5   # fit, then B_crit(L=2.5)
    noisescale predict --b-star 2e8 --alpha-b 0.21 --loss 2.5 --unit tokens

With ``S = S_min (1 + B_crit/B)`` and ``E = S_min B_crit (1 + B/B_crit)`` (McCandlish et al.
2018, eqs. 2.11-2.12) it prints, per goal, a table of steps, examples, speed-up against the
smallest batch size and efficiency ``E_min/E``, one sentence per pair of neighbouring batch
sizes ("doubling the batch from 512 to 1024 cuts steps by 31% and costs 38% more examples"),
the batch ``sqrt(r B_crit)`` that minimises ``E + r S`` for an exchange rate ``r``, and B_crit
at loss targets from ``B_crit(L) = B*/L^(1/alpha_B)`` (Kaplan et al. 2020, eq. 5.3), fitted
across the goals of the file or given with ``--b-star`` and ``--alpha-b``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from noisescale._format import format_batch, short_number
from noisescale.cli.common import fail
from noisescale.cli.fit import Unit, law_sentence, output_console
from noisescale.critical.predict import (
    BCritPowerLaw,
    b_crit_at_loss,
    optimal_batch_for_exchange_rate,
    predict_batches,
    tradeoff_sentence,
)
from noisescale.critical.report import report_from_file
from noisescale.errors import SweepDataError
from noisescale.io import to_jsonable

__all__ = ["predict"]


_FIT_JSON = "the JSON of `noisescale fit --json`"


def _is_number(value: object, *, positive: bool) -> bool:
    """A finite JSON number (not a boolean), and positive when asked."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > 0 or not positive


def _entries_from_fit_json(obj: dict, path: Path) -> tuple[list[dict], BCritPowerLaw | None]:
    """Goals (goal, b_crit, s_min, bound, error) and the power law of a ``fit --json`` object.

    Raises:
        SweepDataError: naming ``path`` and the field, on anything ``fit --json`` does not write.
    """
    goals = obj.get("goals", [obj])
    if not isinstance(goals, list) or not goals:
        raise SweepDataError(f"{path}: `goals` is {goals!r}; expected a non-empty list as in {_FIT_JSON}")
    entries = []
    for g in goals:
        if not isinstance(g, dict) or not ({"b_crit", "error"} & set(g)):
            raise SweepDataError(f"{path}: not {_FIT_JSON} (a goal lacks `b_crit`)")
        entry = {k: g.get(k) for k in ("goal", "b_crit", "s_min", "bound", "error")}
        for key, positive in (("goal", False), ("b_crit", True), ("s_min", True)):
            value = entry[key]
            if value is not None and not _is_number(value, positive=positive):
                kind = "a positive number" if positive else "a number"
                raise SweepDataError(
                    f"{path}: `{key}` is {value!r}; expected {kind} or null as in {_FIT_JSON}"
                )
        entries.append(entry)
    law = obj.get("power_law")
    if law is None:
        return entries, None
    if not (
        isinstance(law, dict)
        and _is_number(law.get("b_star"), positive=True)
        and _is_number(law.get("alpha_b"), positive=True)
    ):
        raise SweepDataError(
            f"{path}: `power_law` is {law!r}; expected null or positive `b_star` and `alpha_b` "
            f"as in {_FIT_JSON}"
        )
    return entries, BCritPowerLaw(float(law["b_star"]), float(law["alpha_b"]))


def _load_entries(
    path: Path, goals: list[float] | None
) -> tuple[list[dict], BCritPowerLaw | None, str | None]:
    """From a fit JSON file (selecting ``goals``) or a sweep file (fitted here), with its unit."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    if isinstance(obj, dict) and ({"b_crit", "goals"} & set(obj)):
        entries, law = _entries_from_fit_json(obj, path)
        if goals:
            have = [e["goal"] for e in entries]
            for g in goals:
                if not any(h is not None and np.isclose(h, g) for h in have):
                    raise SweepDataError(f"{path}: goal {g:g} is not in this fit (goals: {have})")
            entries = [e for e in entries if e["goal"] is not None and np.isclose(e["goal"], goals).any()]
        unit = obj.get("unit")
        return entries, law, unit if isinstance(unit, str) else None
    report = report_from_file(path, goals)
    entries = [
        {
            "goal": g.goal,
            "b_crit": None if g.fit is None else g.fit.b_crit,
            "s_min": None if g.fit is None else g.fit.s_min,
            "bound": None if g.fit is None else g.fit.bound,
            "error": g.error,
        }
        for g in report.goals
    ]
    return entries, report.power_law, report.unit


def _default_batches(b_crit: float) -> list[float]:
    """Powers of two from about B_crit/4 to 4 B_crit."""
    lo, hi = int(np.floor(np.log2(b_crit / 4))), int(np.ceil(np.log2(4 * b_crit)))
    return [2.0**k for k in range(max(lo, 0), max(hi, 1) + 1)]


def _prediction(entry: dict, batches: list[float] | None, rate: float | None, unit: str) -> dict[str, Any]:
    b_crit, s_min = float(entry["b_crit"]), entry["s_min"]
    sizes = sorted(set(batches)) if batches else _default_batches(b_crit)
    df = predict_batches(sizes, b_crit=b_crit, s_min=s_min)
    sentences = [tradeoff_sentence(a, b, b_crit, unit=unit) for a, b in itertools.pairwise(sizes)]
    optimum = None
    if rate is not None:
        best = optimal_batch_for_exchange_rate(rate, b_crit)
        optimum = {"exchange_rate": rate, "batch_size": best}
        sentences.append(
            f"at an exchange rate of {rate:g} {unit} per step, the batch that minimises "
            f"{unit} + rate x steps is sqrt(rate x B_crit) = {format_batch(best)} {unit}"
        )
    return {
        "goal": entry.get("goal"),
        "b_crit": b_crit,
        "s_min": s_min,
        "rows": df.to_dict(orient="records"),
        "sentences": sentences,
        "optimum": optimum,
    }


def _print_prediction(console: Console, pred: dict, unit: str) -> None:
    name = "" if pred["goal"] is None else f"goal {pred['goal']:g}: "
    s_min = "" if pred["s_min"] is None else f", S_min = {short_number(pred['s_min'])} steps"
    table = Table(title=f"{name}B_crit = {format_batch(pred['b_crit'])} {unit}{s_min}")
    ref = format_batch(pred["rows"][0]["batch_size"])
    for col in (f"batch size ({unit})", "steps", unit, f"speed-up vs {ref}", "efficiency E_min/E"):
        table.add_column(col, justify="right")
    for r in pred["rows"]:
        known = r["steps"] == r["steps"]  # NaN without S_min
        table.add_row(
            format_batch(r["batch_size"]),
            short_number(r["steps"]) if known else "-",
            short_number(r["examples"]) if known else "-",
            f"{r['speedup']:.2f}x",
            f"{r['efficiency']:.0%}",
        )
    console.print(table)
    for s in pred["sentences"]:
        console.print(s)


def _check(
    b_crit: float | None,
    s_min: float | None,
    from_file: Path | None,
    goal: list[float] | None,
    loss: list[float] | None,
    law: tuple[float | None, float | None],
) -> None:
    """Raise ValueError on options that do not go together or values that are not positive."""
    if from_file is not None and (b_crit is not None or s_min is not None):
        raise ValueError("give either --from FILE or --b-crit/--s-min, not both")
    if s_min is not None and b_crit is None:
        raise ValueError("--s-min needs --b-crit")
    if goal and from_file is None:
        raise ValueError("--goal selects goals of a file: give --from FILE")
    if (law[0] is None) != (law[1] is None):
        raise ValueError("give both --b-star and --alpha-b")
    values = [("--b-crit", b_crit), ("--s-min", s_min), ("--b-star", law[0]), ("--alpha-b", law[1])]
    for name, v in [*values, *(("--loss", x) for x in loss or [])]:
        if v is not None and not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be positive, got {v:g}")


def predict(
    b_crit: Annotated[float | None, typer.Option(help="Critical batch size, in --unit.")] = None,
    s_min: Annotated[
        float | None, typer.Option(help="Minimum number of steps S_min (for absolute steps).")
    ] = None,
    batch_size: Annotated[
        list[float] | None,
        typer.Option("--batch-size", help="Batch size to predict at (repeat; default ~B_crit/4..4B_crit)."),
    ] = None,
    exchange_rate: Annotated[
        float | None,
        typer.Option(help="r, how many examples one step is worth: prints the batch minimising E + r S."),
    ] = None,
    from_file: Annotated[
        Path | None, typer.Option("--from", help="JSON of `noisescale fit --json`, or a sweep file to fit.")
    ] = None,
    goal: Annotated[
        list[float] | None, typer.Option("--goal", help="Goal(s) to use from --from (repeat).")
    ] = None,
    loss: Annotated[
        list[float] | None, typer.Option("--loss", help="Loss target for B_crit(L) (repeat).")
    ] = None,
    b_star: Annotated[
        float | None, typer.Option(help="B* of B_crit(L) = B*/L^(1/alpha_B), in --unit.")
    ] = None,
    alpha_b: Annotated[
        float | None, typer.Option(help="alpha_B of B_crit(L) (Kaplan et al. 2020: 0.21).")
    ] = None,
    unit: Annotated[
        Unit | None,
        typer.Option(help="What a batch size counts (default: the unit of --from, else examples)."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON object instead of tables.")
    ] = False,
) -> None:
    """Predict steps, examples and speed-up at any batch size from B_crit (and S_min).

    Example: noisescale predict --b-crit 835 --s-min 1200 --batch-size 512 --batch-size 1024
    """
    units = Unit.examples.value if unit is None else unit.value
    try:
        _check(b_crit, s_min, from_file, goal, loss, (b_star, alpha_b))
        law = None if b_star is None or alpha_b is None else BCritPowerLaw(b_star, alpha_b)  # both or neither
        entries: list[dict] = []
        if from_file is not None:
            entries, file_law, file_unit = _load_entries(from_file, goal)
            if unit is not None and file_unit is not None and unit.value != file_unit:
                msg = f"{from_file} gives batch sizes in {file_unit}, not {unit.value}: drop --unit"
                raise ValueError(msg)
            units = file_unit or units
            law = law or file_law
        elif b_crit is not None:
            entries = [{"goal": None, "b_crit": b_crit, "s_min": s_min, "bound": None, "error": None}]
        elif law is None:
            raise ValueError("give --b-crit (and --s-min), --from FILE, or --b-star and --alpha-b")
        if loss and law is None:
            raise ValueError("--loss needs B_crit(L): --b-star and --alpha-b, or --from with 3 or more goals")
        if (batch_size or exchange_rate is not None) and not entries:
            raise ValueError("--batch-size and --exchange-rate need B_crit: give --b-crit or --from FILE")
        preds = [_prediction(e, batch_size, exchange_rate, units) for e in entries if e.get("b_crit")]
        at_loss = [{"loss": x, "b_crit": b_crit_at_loss(x, *law)} for x in loss or []] if law else []
    except (SweepDataError, ValueError) as exc:
        raise fail(str(exc)) from None
    skipped = [e for e in entries if not e.get("b_crit")]
    if entries and not preds and not at_loss:  # only a file's goals can lack B_crit
        raise fail(f"{from_file}: " + "; ".join(_why(e) for e in skipped))
    if json_output:
        obj = {
            "unit": units,
            "predictions": preds,
            "skipped": [{"goal": e["goal"], "reason": _why(e)} for e in skipped],
            "power_law": None if law is None else {"b_star": law.b_star, "alpha_b": law.alpha_b},
            "b_crit_at_loss": at_loss,
        }
        typer.echo(json.dumps(to_jsonable(obj), indent=2, allow_nan=False))
        return
    console = output_console()
    for pred in preds:
        _print_prediction(console, pred, units)
    for e in skipped:
        console.print(_why(e))
    if law is not None:
        console.print(law_sentence(law, units))
    for row in at_loss:
        console.print(f"at loss {row['loss']:g}: B_crit = {short_number(row['b_crit'])} {units}")


def _why(entry: dict) -> str:
    name = "goal" if entry.get("goal") is None else f"goal {entry['goal']:g}"
    if entry.get("error"):
        return f"{name}: {entry['error']}"
    bound = entry.get("bound") or "B_crit not constrained"
    return (
        f"{name}: the sweep does not bracket B_crit ({bound}); no prediction without a value, pass --b-crit"
    )
