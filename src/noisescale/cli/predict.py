"""``noisescale predict``: steps, examples and speed-up at any batch size from B_crit.

Usage::

    noisescale predict --b-crit 835 --s-min 1200 --batch-size 512 --batch-size 1024
    noisescale predict --b-crit 835 --exchange-rate 4000          # cheapest batch for E + r S
    noisescale predict --from fit.json                            # output of `noisescale fit --json`
    noisescale predict --from curves.csv --goal 3.0 --goal 2.8 --loss 2.5   # fit, then B_crit(L=2.5)
    noisescale predict --b-star 2e8 --alpha-b 0.21 --loss 2.5 --unit tokens
    noisescale predict --b-crit 835 --s-min 1200 --flops-per-example 1.2e6 --throughput 5e4 --devices 8
    noisescale predict --b-noise-from runs/linreg --batch-size 16        # learning rate, eq. 2.6

With ``S = S_min (1 + B_crit/B)`` and ``E = S_min B_crit (1 + B/B_crit)`` (McCandlish et al.
2018, eqs. 2.11-2.12) it prints, per goal, a table of steps, examples, speed-up against the
smallest batch size and efficiency ``E_min/E``, one sentence per pair of neighbouring batch
sizes ("doubling the batch from 512 to 1024 cuts steps by 31% and costs 38% more examples"),
the batch ``sqrt(r B_crit)`` that minimises ``E + r S`` for an exchange rate ``r``, and B_crit
at loss targets from ``B_crit(L) = B*/L^(1/alpha_B)`` (Kaplan et al. 2020, eq. 5.3), fitted
across the goals of the file or given with ``--b-star`` and ``--alpha-b``.

Optional columns: the learning rate ``eps_max/(1 + B_noise/B)`` of plain SGD (eq. 2.6; ``eps_max``
and ``B_noise`` given, or read from a ``noisescale measure --b-noise`` run), and with FLOPs per
example ``F`` (``summary.json`` of ``measure`` records them) the compute ``F E`` in FLOPs and
PF-days, ``C/C_min = 1 + B/B_crit`` (Kaplan et al. 2020, eq. 5.5) and, with a throughput per
device, the wall-clock time on ``--devices`` devices.
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

from noisescale._format import format_batch, format_duration, short_number
from noisescale.cli.common import fail
from noisescale.cli.fit import Unit, law_sentence, output_console
from noisescale.critical.predict import (
    PF_DAY,
    BCritPowerLaw,
    b_crit_at_loss,
    learning_rate_at,
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


def _learning_rate(
    eps_max: float | None, b_noise: float | None, run: Path | None
) -> tuple[tuple[float, float] | None, str | None]:
    """``(eps_max, b_noise)`` from the options or a ``measure --b-noise`` run, and the run's unit.

    Raises:
        ValueError: on half a pair, both sources, or a run without a resolved B_noise.
    """
    if (eps_max is None) != (b_noise is None):
        raise ValueError("give both --eps-max and --b-noise (or --b-noise-from a run)")
    if run is None:
        return (None if eps_max is None or b_noise is None else (eps_max, b_noise)), None
    if eps_max is not None:
        raise ValueError("give either --b-noise-from RUN or --eps-max and --b-noise, not both")
    path = run / "summary.json" if run.is_dir() else run
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--b-noise-from {path}: cannot read a summary.json ({exc})") from None
    if not isinstance(summary, dict) or "b_noise" not in summary:
        raise ValueError(f"{path} has no b_noise: measure with `noisescale measure --b-noise`")
    eps, b = summary.get("eps_max"), summary.get("b_noise")
    if not (_is_number(eps, positive=True) and _is_number(b, positive=True)):
        why = summary.get("b_noise_reason") or "not resolved"
        raise ValueError(f"{path}: B_noise and eps_max are not both resolved ({why})")
    unit = summary.get("unit")
    return (float(eps), float(b)), unit if isinstance(unit, str) else None  # type: ignore[arg-type]


def _prediction(
    entry: dict, batches: list[float] | None, rate: float | None, unit: str, columns: dict[str, Any]
) -> dict[str, Any]:
    b_crit, s_min = float(entry["b_crit"]), entry["s_min"]
    sizes = sorted(set(batches)) if batches else _default_batches(b_crit)
    df = predict_batches(sizes, b_crit=b_crit, s_min=s_min, **columns)
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


_EXTRA_COLUMNS: dict[str, tuple[str, Any]] = {  # optional columns of predict_batches: header, format
    "lr": ("learning rate", lambda x: f"{x:.3g}"),
    "flops": ("FLOPs", lambda x: f"{x:.3g}"),
    "pf_days": ("PF-days", lambda x: f"{x:.3g}"),
    "compute_ratio": ("C/C_min", lambda x: f"{x:.2f}"),
    "time_s": ("time", format_duration),
}


def _notes(lr: tuple[float, float] | None, columns: dict[str, Any], unit: str) -> list[str]:
    """One line per optional column group: what it assumes and where its numbers came from."""
    notes = []
    if lr is not None:
        notes.append(
            f"learning rate eps_max/(1 + B_noise/B) of plain SGD (McCandlish et al. 2018, eq. 2.6) with "
            f"eps_max = {lr[0]:.4g}, B_noise = {format_batch(lr[1])} {unit}"
        )
    if columns.get("flops_per_example") is not None:
        notes.append(
            f"compute = {columns['flops_per_example']:.3g} FLOPs x {unit}; 1 PF-day = "
            f"{PF_DAY:.3g} FLOPs; C/C_min = 1 + B/B_crit (Kaplan et al. 2020, eq. 5.5)"
        )
    if columns.get("throughput") is not None:
        notes.append(
            f"time = {unit} / ({columns['throughput']:g} {unit}/s per device x {columns['devices']} "
            "device(s)), data parallel with free communication"
        )
    return notes


def _print_prediction(console: Console, pred: dict, unit: str) -> None:
    name = "" if pred["goal"] is None else f"goal {pred['goal']:g}: "
    s_min = "" if pred["s_min"] is None else f", S_min = {short_number(pred['s_min'])} steps"
    table = Table(title=f"{name}B_crit = {format_batch(pred['b_crit'])} {unit}{s_min}")
    ref = format_batch(pred["rows"][0]["batch_size"])
    extra = [c for c in _EXTRA_COLUMNS if c in pred["rows"][0]]
    for col in (f"batch size ({unit})", "steps", unit, f"speed-up vs {ref}", "efficiency E_min/E"):
        table.add_column(col, justify="right")
    for col in extra:
        table.add_column(_EXTRA_COLUMNS[col][0], justify="right")
    for r in pred["rows"]:
        known = r["steps"] == r["steps"]  # NaN without S_min
        table.add_row(
            format_batch(r["batch_size"]),
            short_number(r["steps"]) if known else "-",
            short_number(r["examples"]) if known else "-",
            f"{r['speedup']:.2f}x",
            f"{r['efficiency']:.0%}",
            *(_EXTRA_COLUMNS[c][1](r[c]) if r[c] == r[c] else "-" for c in extra),
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
    eps_max: Annotated[
        float | None,
        typer.Option(help="eps_max = |G|^2/(G^T H G), plain SGD's best lr for an infinite batch (eq. 2.6)."),
    ] = None,
    b_noise: Annotated[
        float | None,
        typer.Option(help="B_noise = tr(H Sigma)/(G^T H G) (eq. 2.8), in --unit; with --eps-max."),
    ] = None,
    b_noise_from: Annotated[
        Path | None,
        typer.Option(
            "--b-noise-from", help="A `noisescale measure --b-noise` run folder or its summary.json."
        ),
    ] = None,
    flops_per_example: Annotated[
        float | None,
        typer.Option(help="FLOPs of one example's forward + backward (measure's summary.json has them)."),
    ] = None,
    throughput: Annotated[
        float | None, typer.Option(help="Examples (in --unit) per second of one device: adds the time.")
    ] = None,
    devices: Annotated[int, typer.Option(min=1, help="Devices sharing each batch (with --throughput).")] = 1,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON object instead of tables.")
    ] = False,
) -> None:
    """Predict steps, examples and speed-up at any batch size from B_crit (and S_min).

    Example: noisescale predict --b-crit 835 --s-min 1200 --batch-size 512 --batch-size 1024
    """
    units = Unit.examples.value if unit is None else unit.value
    columns: dict[str, Any] = {}
    try:
        _check(b_crit, s_min, from_file, goal, loss, (b_star, alpha_b))
        lr, lr_unit = _learning_rate(eps_max, b_noise, b_noise_from)
        law = None if b_star is None or alpha_b is None else BCritPowerLaw(b_star, alpha_b)  # both or neither
        entries: list[dict] = []
        file_unit = None
        if from_file is not None:
            entries, file_law, file_unit = _load_entries(from_file, goal)
            if unit is not None and file_unit is not None and unit.value != file_unit:
                msg = f"{from_file} gives batch sizes in {file_unit}, not {unit.value}: drop --unit"
                raise ValueError(msg)
            units = file_unit or units
            law = law or file_law
        elif b_crit is not None:
            entries = [{"goal": None, "b_crit": b_crit, "s_min": s_min, "bound": None, "error": None}]
        elif law is None and lr is None:
            raise ValueError(
                "give --b-crit (and --s-min), --from FILE, --b-star and --alpha-b, or --eps-max and --b-noise"
            )
        if lr_unit is not None and lr_unit != units:
            if unit is not None or file_unit is not None:
                raise ValueError(f"{b_noise_from} gives B_noise in {lr_unit}, the batch sizes are in {units}")
            units = lr_unit
        if loss and law is None:
            raise ValueError("--loss needs B_crit(L): --b-star and --alpha-b, or --from with 3 or more goals")
        if ((batch_size and lr is None) or exchange_rate is not None) and not entries:
            raise ValueError(
                "--batch-size and --exchange-rate need B_crit: give --b-crit or --from FILE (for the "
                "learning rate alone, --batch-size with --eps-max and --b-noise)"
            )
        if devices != 1 and throughput is None:
            raise ValueError("--devices shares --throughput's examples per second: give --throughput too")
        if (flops_per_example is not None or throughput is not None) and not entries:
            raise ValueError("--flops-per-example and --throughput need B_crit: give --b-crit or --from FILE")
        columns = {"learning_rate": lr, "flops_per_example": flops_per_example, "throughput": throughput}
        columns["devices"] = devices
        preds = [
            _prediction(e, batch_size, exchange_rate, units, columns) for e in entries if e.get("b_crit")
        ]
        lr_rows = [] if lr is None or entries else _lr_rows(batch_size, lr)
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
            "learning_rate": lr and {"eps_max": lr[0], "b_noise": lr[1], "run": b_noise_from},
            "learning_rates": lr_rows,
            "compute": None if flops_per_example is None and throughput is None else {
                "flops_per_example": flops_per_example, "pf_day_flops": PF_DAY, "throughput": throughput,
                "devices": devices,
            },
        }  # fmt: skip
        typer.echo(json.dumps(to_jsonable(obj), indent=2, allow_nan=False))
        return
    console = output_console()
    for pred in preds:
        _print_prediction(console, pred, units)
    if lr_rows:
        table = Table(title="plain SGD")
        table.add_column(f"batch size ({units})", justify="right")
        table.add_column("learning rate", justify="right")
        for r in lr_rows:
            table.add_row(format_batch(r["batch_size"]), f"{r['lr']:.3g}")
        console.print(table)
    for line in _notes(lr, columns, units):
        console.print(line)
    for e in skipped:
        console.print(_why(e))
    if law is not None:
        console.print(law_sentence(law, units))
    for row in at_loss:
        console.print(f"at loss {row['loss']:g}: B_crit = {short_number(row['b_crit'])} {units}")


def _lr_rows(batches: list[float] | None, lr: tuple[float, float]) -> list[dict[str, float]]:
    """The learning rate at each batch size (default: powers of two around B_noise), no B_crit needed."""
    sizes = sorted(set(batches)) if batches else _default_batches(lr[1])
    return [{"batch_size": b, "lr": learning_rate_at(b, *lr)} for b in sizes]


def _why(entry: dict) -> str:
    name = "goal" if entry.get("goal") is None else f"goal {entry['goal']:g}"
    if entry.get("error"):
        return f"{name}: {entry['error']}"
    bound = entry.get("bound") or "B_crit not constrained"
    return (
        f"{name}: the sweep does not bracket B_crit ({bound}); no prediction without a value, pass --b-crit"
    )
