"""Reading batch-size sweeps from users' files and turning loss curves into steps-to-goal.

Two layouts, in CSV or JSON Lines (detected from the content, not the extension):

* one row per run: ``batch_size, steps`` (steps to reach the goal), optional ``goal`` (several
  goals in one file), ``metric`` (what the goal is a level of: ``train_loss``, ``test_error``...;
  default ``loss``), ``reached`` (false: the run stopped after ``steps`` without reaching the
  goal, a censored run), ``steps_low``/``steps_high`` (the logged steps around the crossing),
  ``run``, ``lr``, ``b_simple`` and ``unit`` (what a batch size counts: ``images``,
  ``tokens``...). A sweep's ``results.csv`` is such a file;
* loss curves, one row per logged step: ``batch_size, step, loss``, optional ``run`` (tells
  apart runs sharing a batch size, e.g. a learning-rate grid), ``lr``, ``b_simple`` and ``unit``.
  An empty loss cell (JSON null) is NaN, as pandas writes it; a row repeated word for word (logs
  concatenated after a restart) counts once. Every curve needs a point after step 0.

A batch size is a positive whole number (of examples, tokens... in ``unit``, one per file).

Steps-to-goal from a loss curve follow the one rule of :mod:`noisescale.critical.goals`, the
rule of ``noisescale sweep``: the crossing is interpolated between the logged steps around it
and keeps them as its bracket; a run that never gets there is censored at its last logged
step; of the runs sharing a batch size the fastest to the goal is kept (McCandlish et al. 2018,
appendix A.2), else the batch size is censored at the fewest steps of the runs that did not
diverge (a curve whose last loss is not finite diverged; as the sweep stops a run at its first
non-finite loss, such a curve ends at the first step of its non-finite tail). Its B_simple is
the step-weighted mean of the logged ``b_simple`` up to the crossing
(:func:`noisescale.critical.goals.run_mean`).

Every problem raises :class:`~noisescale.errors.SweepDataError` naming the line of the file.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    appendix A.2-A.3.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from noisescale._format import format_batch
from noisescale.critical.goals import RunOutcome, crossing, fastest, run_mean
from noisescale.critical.sweepfile import read_table
from noisescale.errors import SweepDataError

__all__ = ["COLUMNS", "DEFAULT_METRIC", "load_sweep", "read_table", "steps_to_goal", "table_unit"]

# One row per (metric, goal, batch size): the table of a sweep, in files and in memory.
COLUMNS = [
    "metric",  # what the goal is a level of: "loss" (a user's file), "train_loss", "test_error"
    "goal",  # level of the metric; NaN for a file with a single unnamed goal
    "batch_size",  # in `unit`
    "steps",  # to the goal (interpolated), or run without reaching it (censored)
    "steps_low",  # the crossing lies in (steps_low, steps_high]; both equal steps when exact
    "steps_high",
    "reached",  # False: censored, the steps to the goal exceed `steps`
    "run",  # name of the run kept for this batch size (str or None)
    "lr",  # its learning rate (NaN: not given)
    "b_simple",  # its run-averaged B_simple to the goal, in `unit` (NaN: not measured)
    "b_simple_preconditioned",  # the same of the preconditioned B_simple (under Adam; NaN: not measured)
    "unit",  # what a batch size counts: images, tokens, observations, examples (None: not given)
]
DEFAULT_METRIC = "loss"  # the metric of a file without a `metric` column
_NAN_WORDS = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}
_TRUE = {"true", "1", "yes", "y", "t", "1.0"}
_FALSE = {"false", "0", "no", "n", "f", "0.0"}


def _numeric(df: pd.DataFrame, col: str, *, allow_nan: bool = False) -> np.ndarray:
    """Column as float64; names the first line with a missing or non-numeric cell.

    Cells are numbers (JSON) or text (CSV; JSON strings). None or blank text is missing; the
    words nan/inf are accepted as non-finite values. ``allow_nan`` lets those through and reads
    a missing cell as NaN (how pandas writes NaN: an empty CSV cell, a JSON null).
    """
    raw = df[col]
    kinds = raw.map(type)
    values = np.full(len(raw), np.nan)
    is_num = kinds.isin([int, float]).to_numpy()
    values[is_num] = raw[is_num].to_numpy(float)
    missing = kinds.isin([type(None)]).to_numpy().copy()
    bad = kinds.isin([bool]).to_numpy().copy()
    is_text = kinds.isin([str]).to_numpy()
    shown = raw.astype(object).to_numpy()
    if is_text.any():
        text = raw[is_text].str.strip()
        empty = (text == "").to_numpy()
        parsed = np.array(pd.to_numeric(text.where(~empty, "nan"), errors="coerce"), dtype=float)
        word = text.str.lower().isin(_NAN_WORDS).to_numpy()
        missing[is_text] = empty
        bad[is_text] = np.isnan(parsed) & ~empty & ~word
        parsed[word] = [float(w.replace("infinity", "inf")) for w in text[word].str.lower()]
        values[is_text] = parsed
    bad |= ~(is_num | is_text | missing)
    problems = [(missing & (not allow_nan), "is empty"), (bad, "is not a number")]
    if not allow_nan:
        problems.append((~np.isfinite(values) & ~missing & ~bad, "is not finite"))
    for mask, what in problems:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            cell = "" if what == "is empty" else f" ({str(shown[i]).strip()!r})"
            raise SweepDataError(f"line {df['_line'].iloc[i]}: column `{col}`{cell} {what}")
    return values


def _boolean(df: pd.DataFrame, col: str) -> np.ndarray:
    text = df[col].map(lambda v: "" if v is None else str(v).strip().lower())
    bad = ~(text.isin(_TRUE) | text.isin(_FALSE))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise SweepDataError(
            f"line {df['_line'].iloc[i]}: column `{col}` is {text.iloc[i]!r}; use true/false or 1/0"
        )
    return text.isin(_TRUE).to_numpy(bool)


def load_sweep(path: str | Path, goals: Sequence[float] | None = None) -> pd.DataFrame:
    """Read a sweep file into one row per (metric, goal, batch size).

    Args:
        path: CSV or JSON Lines file, one row per run or loss curves (see the module docstring).
        goals: goal levels. Required for loss curves; for a per-run file with a ``goal``
            column, selects those goals (default: all).

    Returns:
        DataFrame with the columns :data:`COLUMNS`, in the order the goals first appear in the
        file, then by batch size.

    Raises:
        SweepDataError: on a missing or unreadable file, missing columns, empty or
            non-numeric cells (with the line), batch sizes that are not positive whole numbers,
            non-positive steps, a batch size listed twice for a goal in a per-run file, a step
            logged twice with different values, no goal for loss curves, a goal not in the file
            or not finite, a curve with no point after step 0 (or none with two points), a run
            that meets a goal at its first logged step 0, or several units in one file.
    """
    if goals is not None and not np.all(np.isfinite(np.asarray(goals, dtype=float))):
        raise SweepDataError(f"goals must be finite numbers, got {list(goals)}")
    table = read_table(path)
    cols = set(table.columns)
    try:
        _one_unit(table)
        if {"batch_size", "step", "loss"} <= cols:
            if not goals:
                raise SweepDataError("loss curves need at least one goal: pass --goal (e.g. --goal 3.5)")
            out = steps_to_goal(_curves(table), goals)
        elif {"batch_size", "steps"} <= cols:
            out = _runs(table, goals)
        else:
            raise SweepDataError(
                f"columns {', '.join(sorted(c for c in cols if c != '_line'))}; expected "
                "`batch_size, steps` (one row per run, optional `goal`, `metric`, `reached`) or "
                "`batch_size, step, loss` (loss curves, optional `run`, `lr`)"
            )
        table_unit(out)
    except SweepDataError as exc:
        raise SweepDataError(f"{path}: {exc}") from None
    return out


def table_unit(table: pd.DataFrame) -> str | None:
    """The one unit of a sweep table's batch sizes, or None when the table does not say.

    Raises:
        SweepDataError: if rows give different units.
    """
    units = sorted({u for u in table["unit"] if isinstance(u, str) and u})
    if len(units) > 1:
        raise SweepDataError(f"batch sizes in several units ({', '.join(units)}): give one unit per file")
    return units[0] if units else None


def _one_unit(table: pd.DataFrame) -> None:
    """Refuse a file whose ``unit`` column names several units, with the first line of each."""
    if "unit" in table.columns:
        units = _text(table, "unit", None)
        first = table["_line"][units.notna()].groupby(units[units.notna()], sort=False).first()
        if len(first) > 1:
            where = ", ".join(f"{u} (line {line})" for u, line in first.items())
            raise SweepDataError(f"column `unit` has several values: {where}; give one unit per file")


def _text(table: pd.DataFrame, col: str, default: str | None) -> pd.Series:
    """A text column (stripped, None where blank), or ``default`` everywhere when absent."""
    if col not in table.columns:
        return pd.Series([default] * len(table), index=table.index, dtype=object)
    return table[col].map(lambda v: default if v is None or not str(v).strip() else str(v).strip())


def _optional(table: pd.DataFrame, col: str, *, allow_nan: bool = True) -> np.ndarray:
    if col not in table.columns:
        return np.full(len(table), np.nan)
    present = table[col].map(lambda v: v is not None and str(v).strip() != "")
    out = np.full(len(table), np.nan)
    if present.any():
        out[present.to_numpy()] = _numeric(table[present], col, allow_nan=allow_nan)
    return out


def _positive(table: pd.DataFrame, values: np.ndarray, col: str) -> None:
    bad = ~(values > 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        line = table["_line"].iloc[i]
        raise SweepDataError(f"line {line}: column `{col}` must be positive, got {values[i]:g}")


def _batch_sizes(table: pd.DataFrame, values: np.ndarray) -> None:
    """Refuse batch sizes that are not positive whole numbers, naming the lines (up to 6)."""
    bad = ~(values > 0) | (values != np.round(values))
    if bad.any():
        lines = table["_line"].to_numpy()[bad]
        more = f" (lines {', '.join(map(str, lines[:6]))}{', ...' if len(lines) > 6 else ''})"
        raise SweepDataError(
            f"line {lines[0]}: column `batch_size` must be a positive whole number, got "
            f"{values[bad][0]:g}{more if len(lines) > 1 else ''}"
        )


def _runs(table: pd.DataFrame, goals: Sequence[float] | None) -> pd.DataFrame:
    steps = _numeric(table, "steps")
    low, high = _optional(table, "steps_low"), _optional(table, "steps_high")
    out = pd.DataFrame(
        {
            "metric": _text(table, "metric", DEFAULT_METRIC).to_numpy(),
            "goal": _numeric(table, "goal") if "goal" in table.columns else np.nan,
            "batch_size": _numeric(table, "batch_size"),
            "steps": steps,
            "steps_low": np.where(np.isnan(low), steps, low),  # not given: known exactly
            "steps_high": np.where(np.isnan(high), steps, high),
            "reached": _boolean(table, "reached") if "reached" in table.columns else True,
            "run": _text(table, "run", None).to_numpy(),
            "lr": _optional(table, "lr"),
            "b_simple": _optional(table, "b_simple"),
            "b_simple_preconditioned": _optional(table, "b_simple_preconditioned"),
            "unit": _text(table, "unit", None).to_numpy(),
            "_line": table["_line"].to_numpy(),
        }
    )
    _batch_sizes(table, out["batch_size"].to_numpy())
    _positive(table, out["steps"].to_numpy(), "steps")
    if goals:
        if "goal" not in table.columns:
            raise SweepDataError(
                "one row per run without a `goal` column: --goal selects goals from a `goal` "
                "column or derives them from loss curves (`batch_size, step, loss`)"
            )
        out = out[_select_goals(out["goal"].to_numpy(), goals)]
    key = out["metric"] + "\0" + out["goal"].fillna(-np.inf).map(repr)
    dup = out[out.assign(_k=key).duplicated(["_k", "batch_size"], keep=False)]
    if len(dup):
        first = dup[(dup["batch_size"] == dup["batch_size"].iloc[0]) & (key[dup.index] == key[dup.index[0]])]
        lines = ", ".join(str(v) for v in first["_line"])
        raise SweepDataError(
            f"batch size {format_batch(first['batch_size'].iloc[0])} appears on lines {lines}"
            + ("" if np.isnan(first["goal"].iloc[0]) else f" for goal {first['goal'].iloc[0]:g}")
            + "; give one run per batch size (the fastest to the goal), or give loss curves "
            "(`batch_size, step, loss, run`) and the fastest run is taken"
        )
    order = {g: i for i, g in enumerate(pd.unique(key))}
    out = out.assign(_o=key.map(order)).sort_values(["_o", "batch_size"], kind="stable")
    return out[COLUMNS].reset_index(drop=True)


def _select_goals(values: np.ndarray, goals: Sequence[float]) -> np.ndarray:
    keep = np.zeros(values.shape, bool)
    for g in goals:
        hit = np.isclose(values, g, rtol=1e-9, atol=0.0)
        if not hit.any():
            have = ", ".join(f"{v:g}" for v in pd.unique(values))
            raise SweepDataError(f"goal {g:g} is not in the file (goals there: {have})")
        keep |= hit
    return keep


def _curves(table: pd.DataFrame) -> pd.DataFrame:
    """Validated loss curves: batch_size, step, loss, run (str), lr, b_simple, unit, _line."""
    df = pd.DataFrame(
        {
            "batch_size": _numeric(table, "batch_size"),
            "step": _numeric(table, "step"),
            "loss": _numeric(table, "loss", allow_nan=True),  # a diverged run logs NaN/inf (or empty)
            "lr": _optional(table, "lr"),
            "b_simple": _optional(table, "b_simple"),
            "unit": _text(table, "unit", None).to_numpy(),
            "_line": table["_line"].to_numpy(),
        }
    )
    _batch_sizes(table, df["batch_size"].to_numpy())
    if (df["step"] < 0).any():
        i = int(np.flatnonzero(df["step"] < 0)[0])
        raise SweepDataError(
            f"line {df['_line'].iloc[i]}: column `step` is negative ({df['step'].iloc[i]:g}); "
            "steps count the updates, from 0 before training"
        )
    if "run" in table.columns:
        df["run"] = table["run"].map(lambda v: "" if v is None else str(v)).to_numpy()
        per_run = df.groupby("run")["batch_size"].nunique()
        if (per_run > 1).any():
            name = per_run[per_run > 1].index[0]
            raise SweepDataError(f"run {name!r} has more than one batch size; give each run its own name")
    else:
        names = {b: f"batch {format_batch(b)}" for b in df["batch_size"].unique()}
        lrs = {v: "" if np.isnan(v) else f" lr={v:g}" for v in df["lr"].unique()}
        df["run"] = df["batch_size"].map(names) + df["lr"].map(lrs)
    df = df[~df.duplicated([c for c in df.columns if c != "_line"])]  # a row repeated word for word
    dup = df.duplicated(["run", "step"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        rows = df[(df["run"] == first["run"]) & (df["step"] == first["step"])]
        hint = "" if "run" in table.columns else "; add a `run` column to tell apart runs of one batch size"
        raise SweepDataError(
            f"{first['run']} logs step {first['step']:g} more than once with different values "
            f"(lines {', '.join(str(v) for v in rows['_line'].head(4))}){hint}"
        )
    return df


def steps_to_goal(curves: pd.DataFrame, goals: Sequence[float], metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """Steps-to-goal per (goal, batch size) from loss curves, by the rule of :mod:`noisescale.critical.goals`.

    Args:
        curves: rows ``batch_size, step, loss, run`` (optional ``lr``, ``b_simple``, ``unit``, ``_line``).
        goals: loss levels; each crossing is interpolated between the logged steps around it.
        metric: the name of the curves' metric in the table.

    Returns:
        DataFrame with the columns :data:`COLUMNS`.

    Raises:
        SweepDataError: if a run meets a goal at step 0 (no steps to count), a run logs step 0
            only, every run logs a single point, or ``goals`` is empty.
    """
    if len(goals) == 0:
        raise SweepDataError("no goal given")
    size, last = (curves.groupby("run")["step"].transform(f).to_numpy() for f in ("size", "max"))
    if (last <= 0).any():
        c = curves[last <= 0].iloc[:1]
        raise SweepDataError(
            f"{c['run'].iloc[0]} logs the loss at step 0 only{_at(c)}: a loss curve needs at least two "
            "logged points, before training (step 0) and after some updates; log the loss during "
            "training, or give the steps to each goal directly (`batch_size, steps`, one row per run)"
        )
    if (size == 1).all():
        c = curves.iloc[:1]
        raise SweepDataError(
            f"every run logs a single point ({c['run'].iloc[0]} at step {c['step'].iloc[0]:g}"
            f"{_at(c, ', ', '')}): a loss curve needs the loss at several steps of a run, from step 0 "
            "on, to tell when it reaches a goal; log it during training, or give the steps to each "
            "goal directly (`batch_size, steps`, one row per run)"
        )
    curves = curves.sort_values(["run", "step"], kind="stable")
    runs = []  # (batch_size, name, steps, loss, b_simple, lr, unit, stopped), by batch size then name
    for name, c in curves.groupby("run", sort=True):
        loss, steps = c["loss"].to_numpy(float), c["step"].to_numpy(float)
        end, stopped = len(c), "end"
        if not np.isfinite(loss[-1]):  # diverged: ends at the first step of its non-finite tail, past 0
            finite = np.flatnonzero(np.isfinite(loss))
            end, stopped = max(finite[-1] + 1 if len(finite) else 0, int(steps[0] <= 0)) + 1, "diverged"
        unit = next((u for u in c.get("unit", []) if u), None)
        runs.append((float(c["batch_size"].iloc[0]), str(name), steps[:end], loss[:end],
                     c["b_simple"].to_numpy(float)[:end], float(c["lr"].iloc[0]), unit, stopped))  # fmt: skip
    runs.sort(key=lambda r: r[0])
    rows = []
    for goal in goals:
        for b in sorted({r[0] for r in runs}):
            mine = [r for r in runs if r[0] == b]
            outcomes = []
            for _, name, steps, loss, _, _, _, stopped in mine:
                try:
                    outcomes.append(RunOutcome(crossing(steps.tolist(), loss.tolist(), float(goal)), stopped))
                except SweepDataError as exc:
                    at = _at(curves[(curves["run"] == name) & (curves["step"] == 0)])
                    msg = f"{name} meets goal {goal:g} at step 0{at}; choose a lower goal"
                    raise SweepDataError(msg) from exc
            k = fastest(outcomes)
            _, name, steps, _, b_simple, lr, unit, _ = mine[k]
            cross = outcomes[k].crossing
            bs = run_mean(steps.tolist(), [None if np.isnan(v) else float(v) for v in b_simple], cross.steps)
            rows.append({"metric": metric, "goal": float(goal), "batch_size": b, "steps": cross.steps,
                         "steps_low": cross.low if cross.reached else cross.steps,
                         "steps_high": cross.high if cross.reached else cross.steps, "reached": cross.reached,
                         "run": name, "lr": lr, "b_simple": np.nan if bs is None or not cross.reached else bs,
                         "unit": unit})  # fmt: skip
    out = pd.DataFrame(rows, columns=COLUMNS)
    out["run"] = out["run"].astype(object)
    return out


def _at(rows: pd.DataFrame, head: str = " (", tail: str = ")") -> str:
    """``" (line N)"`` for the first of ``rows``, "" when the rows carry no line."""
    if "_line" not in rows.columns or not len(rows):
        return ""
    return f"{head}line {rows['_line'].iloc[0]}{tail}"
