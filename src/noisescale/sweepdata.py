"""Reading batch-size sweeps from users' files and turning loss curves into steps-to-goal.

Two layouts, in CSV or JSON Lines (detected from the content, not the extension):

* one row per run: ``batch_size, steps`` (steps to reach the goal), optional ``goal`` (several
  goals in one file), ``reached`` (false: the run stopped after ``steps`` without reaching the
  goal, a censored run), ``run``, ``lr`` and ``b_simple``;
* loss curves, one row per logged step: ``batch_size, step, loss``, optional ``run`` (tells
  apart runs sharing a batch size, e.g. a learning-rate grid), ``lr`` and ``b_simple``.

For each goal of a loss curve the steps-to-goal of a run is the first logged step whose loss
is at or below the goal; a run that never gets there is censored at its last logged step.
Where several runs share a batch size the fastest one that reached the goal is kept, as in
McCandlish et al. (2018), appendix A.2 (tune the learning rate per batch size, take the best);
if none reached it, the batch size is censored at the fewest steps any of them ran, since the
best-tuned run would need more than that.

Every problem raises :class:`~noisescale.errors.SweepDataError` naming the line of the file.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    appendix A.2-A.3.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from noisescale.critical import CriticalBatchFit, fit_critical_batch, format_batch
from noisescale.errors import SweepDataError

__all__ = ["GoalFit", "b_simple_by_goal", "fit_sweep", "load_sweep", "read_table", "steps_to_goal"]

COLUMNS = ["goal", "batch_size", "steps", "reached", "run", "lr", "b_simple"]
_NAN_WORDS = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}
_TRUE = {"true", "1", "yes", "y", "t", "1.0"}
_FALSE = {"false", "0", "no", "n", "f", "0.0"}


class GoalFit(NamedTuple):
    """The fit for one goal, or why there is none."""

    goal: float | None  # loss target (None: the file has a single, unnamed goal)
    fit: CriticalBatchFit | None  # None when `error` is set
    error: str | None  # the SweepDataError message
    points: pd.DataFrame  # this goal's rows of the sweep table (COLUMNS)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or JSON Lines file into a DataFrame of raw cells plus its line numbers.

    Column names are stripped, lower-cased, with spaces and dashes turned into underscores.
    A missing cell is None; a JSON file holding one array of objects is also accepted (its
    "lines" are then the positions in the array, from 1).

    Args:
        path: the file.

    Returns:
        DataFrame of object columns plus ``_line`` (int, 1-based line of the file).

    Raises:
        SweepDataError: if the file is missing, a directory, unreadable, not UTF-8 text, empty
            (or a CSV header alone) or not parseable.
    """
    path = Path(path)
    if path.is_dir():
        raise SweepDataError(
            f"{path} is a directory: give a sweep file (CSV or JSON Lines){_in_folder(path)}"
        )
    if not path.is_file():
        raise SweepDataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SweepDataError(
            f"{path}: not a UTF-8 text file (byte {exc.start}); give a CSV or JSON Lines file"
        ) from None
    except OSError as exc:
        raise SweepDataError(f"{path}: cannot read the file ({exc.strerror})") from None
    head = text.lstrip()[:1]
    if not head:
        raise SweepDataError(f"{path}: the file is empty")
    records = _read_json(text, path) if head in "{[" else _read_csv(path)
    records.columns = [_norm(c) for c in records.columns]
    return records


def _in_folder(folder: Path) -> str:
    """Where a sweep directory keeps its results, or why it has none, as the end of a message."""
    if (folder / "results.csv").is_file():
        return f", e.g. {folder / 'results.csv'}"
    if (folder / "config.json").is_file():
        return "; this sweep has no results.csv yet: re-run `noisescale sweep` with its settings to finish it"
    return ""


def _norm(name: object) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def _read_csv(path: Path) -> pd.DataFrame:
    lines: list[int] = []
    rows: list[list[str | None]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) > len(header):
                    raise SweepDataError(
                        f"{path}, line {reader.line_num}: {len(row)} fields but the header has {len(header)} "
                        "(a sweep CSV starts with a header row naming at least `batch_size` and `steps`)"
                    )
                rows.append([c if c.strip() else None for c in row] + [None] * (len(header) - len(row)))
                lines.append(reader.line_num)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise SweepDataError(f"{path}: not a readable CSV file ({exc})") from exc
    if not rows:
        raise SweepDataError(f"{path}: no records below the header")
    df = pd.DataFrame(rows, columns=header, dtype=object)
    df["_line"] = lines
    return df


def _read_json(text: str, path: Path) -> pd.DataFrame:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SweepDataError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(items, list):
            raise SweepDataError(f"{path}: expected a JSON array of objects")
        lines = list(range(1, len(items) + 1))
    else:
        numbered = [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
        lines = [i for i, _ in numbered]
        try:  # one parse of the whole file; line by line only to locate an error
            items = json.loads("[" + ",".join(line for _, line in numbered) + "]")
        except json.JSONDecodeError:
            for i, line in numbered:
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SweepDataError(f"{path}, line {i}: not valid JSON ({exc.msg})") from exc
            raise SweepDataError(f"{path}: not valid JSON Lines (one object per line)") from None
    if not items:
        raise SweepDataError(f"{path}: no records")
    for i, item in zip(lines, items, strict=True):
        if not isinstance(item, dict):
            raise SweepDataError(f"{path}, line {i}: expected a JSON object, got {type(item).__name__}")
    keys = list(dict.fromkeys(k for item in items for k in item))
    # A missing key and a JSON null are both None; an explicit NaN stays a float.
    df = pd.DataFrame([tuple(map(item.get, keys)) for item in items], columns=keys, dtype=object)
    df["_line"] = lines
    return df


def _numeric(df: pd.DataFrame, col: str, *, allow_nan: bool = False) -> np.ndarray:
    """Column as float64; names the first line with a missing or non-numeric cell.

    Cells are numbers (JSON) or text (CSV; JSON strings). None or blank text is missing; the
    words nan/inf are accepted as non-finite values, which only ``allow_nan`` lets through.
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
    problems = [(missing, "is empty"), (bad, "is not a number")]
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
    """Read a sweep file into one row per (goal, batch size).

    Args:
        path: CSV or JSON Lines file, one row per run or loss curves (see the module docstring).
        goals: loss targets. Required for loss curves; for a per-run file with a ``goal``
            column, selects those goals (default: all).

    Returns:
        DataFrame with columns ``goal`` (float, NaN when the file has no goal column),
        ``batch_size`` (examples or tokens, as in the file), ``steps`` (to the goal, or run
        without reaching it), ``reached`` (bool; False: censored), ``run`` (str or None),
        ``lr`` and ``b_simple`` (float, NaN when not given), sorted by goal order then batch size.

    Raises:
        SweepDataError: on a missing or unreadable file, missing columns, empty or
            non-numeric cells (with the line), non-positive batch sizes or steps, a batch size
            listed twice for a goal in a per-run file, no goal for loss curves, a goal not in
            the file or not finite, or a run that meets a goal at its first logged step 0.
    """
    if goals is not None and not np.all(np.isfinite(np.asarray(goals, dtype=float))):
        raise SweepDataError(f"goals must be finite numbers, got {list(goals)}")
    table = read_table(path)
    cols = set(table.columns)
    try:
        if {"batch_size", "step", "loss"} <= cols:
            if not goals:
                raise SweepDataError("loss curves need at least one goal: pass --goal (e.g. --goal 3.5)")
            return steps_to_goal(_curves(table), goals)
        if {"batch_size", "steps"} <= cols:
            return _runs(table, goals)
    except SweepDataError as exc:
        raise SweepDataError(f"{path}: {exc}") from None
    raise SweepDataError(
        f"{path}: columns {', '.join(sorted(c for c in cols if c != '_line'))}; expected "
        "`batch_size, steps` (one row per run, optional `goal`, `reached`) or "
        "`batch_size, step, loss` (loss curves, optional `run`, `lr`)"
    )


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


def _runs(table: pd.DataFrame, goals: Sequence[float] | None) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "goal": _numeric(table, "goal") if "goal" in table.columns else np.nan,
            "batch_size": _numeric(table, "batch_size"),
            "steps": _numeric(table, "steps"),
            "reached": _boolean(table, "reached") if "reached" in table.columns else True,
            "run": table["run"].map(lambda v: None if v is None else str(v)) if "run" in table else None,
            "lr": _optional(table, "lr"),
            "b_simple": _optional(table, "b_simple"),
            "_line": table["_line"].to_numpy(),
        }
    )
    _positive(table, out["batch_size"].to_numpy(), "batch_size")
    _positive(table, out["steps"].to_numpy(), "steps")
    if goals:
        if "goal" not in table.columns:
            raise SweepDataError(
                "one row per run without a `goal` column: --goal selects goals from a `goal` "
                "column or derives them from loss curves (`batch_size, step, loss`)"
            )
        out = out[_select_goals(out["goal"].to_numpy(), goals)]
    key = out["goal"].fillna(-np.inf)
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
    """Validated loss curves: batch_size, step, loss, run (str), lr, b_simple, _line."""
    df = pd.DataFrame(
        {
            "batch_size": _numeric(table, "batch_size"),
            "step": _numeric(table, "step"),
            "loss": _numeric(table, "loss", allow_nan=True),  # a diverged run logs NaN/inf
            "lr": _optional(table, "lr"),
            "b_simple": _optional(table, "b_simple"),
            "_line": table["_line"].to_numpy(),
        }
    )
    _positive(table, df["batch_size"].to_numpy(), "batch_size")
    if (df["step"] < 0).any():
        i = int(np.flatnonzero(df["step"] < 0)[0])
        raise SweepDataError(f"line {df['_line'].iloc[i]}: column `step` is negative")
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
    dup = df.duplicated(["run", "step"], keep=False)
    if dup.any():
        rows = df[dup & (df["run"] == df.loc[dup, "run"].iloc[0])]
        hint = "" if "run" in table.columns else "; add a `run` column to tell apart runs of one batch size"
        raise SweepDataError(
            f"{rows['run'].iloc[0]} logs step {rows['step'].iloc[0]:g} more than once "
            f"(lines {', '.join(str(v) for v in rows['_line'].head(4))}){hint}"
        )
    return df


def steps_to_goal(curves: pd.DataFrame, goals: Sequence[float]) -> pd.DataFrame:
    """Steps-to-goal per (goal, batch size) from loss curves, fastest run per batch size.

    Args:
        curves: rows ``batch_size, step, loss, run`` (optional ``lr``, ``b_simple``, ``_line``).
        goals: loss targets; a run reaches one at its first logged step with ``loss <= goal``.

    Returns:
        DataFrame with the columns of :func:`load_sweep`.

    Raises:
        SweepDataError: if a run meets a goal at step 0 (no steps to count), or ``goals`` is empty.
    """
    if len(goals) == 0:
        raise SweepDataError("no goal given")
    curves = curves.sort_values(["run", "step"], kind="stable")
    last = curves.groupby("run", sort=False).tail(1).set_index("run")
    rows = []
    for goal in goals:
        hit = curves[curves["loss"] <= goal].groupby("run", sort=False).head(1).set_index("run")
        zero = hit[hit["step"] <= 0]
        if len(zero):
            raise SweepDataError(
                f"{zero.index[0]} meets goal {goal:g} at step 0 (line {zero['_line'].iloc[0]}); "
                "choose a lower goal"
            )
        runs = last.copy()
        runs["reached"] = runs.index.isin(hit.index)
        runs.loc[hit.index, "step"] = hit["step"]
        runs["b_simple"] = np.nan if "b_simple" not in hit else hit["b_simple"].reindex(runs.index)
        runs = runs.reset_index()
        # Fastest reached run per batch size; with none, censored at the fewest steps run.
        runs = runs.sort_values(["batch_size", "reached", "step"], ascending=[True, False, True])
        best = runs.groupby("batch_size", sort=True).head(1)
        rows.append(best.assign(goal=float(goal)).rename(columns={"step": "steps"}))
    out = pd.concat(rows, ignore_index=True)
    out["run"] = out["run"].astype(object)
    return out[COLUMNS].reset_index(drop=True)


def fit_sweep(table: pd.DataFrame, **fit_kwargs: object) -> list[GoalFit]:
    """Fit the hyperbola for every goal of a sweep table (as returned by :func:`load_sweep`).

    Args:
        table: rows ``goal, batch_size, steps, reached``.
        **fit_kwargs: passed to :func:`noisescale.critical.fit_critical_batch`
            (``n_bootstrap``, ``confidence``, ``max_increase``, ``seed``).

    Returns:
        One GoalFit per goal, in table order; a goal the data cannot fit carries the message
        of its SweepDataError instead of a fit.
    """
    out = []
    key = table["goal"].fillna(-np.inf)
    for k in pd.unique(key):
        points = table[key == k].reset_index(drop=True)
        goal = None if np.isinf(k) else float(k)
        try:
            fit = fit_critical_batch(
                points["batch_size"], points["steps"], reached=points["reached"], **fit_kwargs
            )
            out.append(GoalFit(goal, fit, None, points))
        except SweepDataError as exc:
            out.append(GoalFit(goal, None, str(exc), points))
    return out


def b_simple_by_goal(table: pd.DataFrame) -> dict[float | None, tuple[float, float, float]]:
    """Median, min and max of the B_simple logged by the runs that reached each goal.

    Args:
        table: a sweep table with a ``b_simple`` column (NaN where not measured).

    Returns:
        ``{goal: (median, low, high)}`` for the goals with at least one value.
    """
    out: dict[float | None, tuple[float, float, float]] = {}
    ok = table[table["reached"] & table["b_simple"].notna()]
    for goal, grp in ok.groupby(ok["goal"].fillna(-np.inf), sort=False):
        v = grp["b_simple"].to_numpy(float)
        out[None if np.isinf(goal) else float(goal)] = (float(np.median(v)), float(v.min()), float(v.max()))
    return out
