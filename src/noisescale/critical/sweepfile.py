"""Reading a user's sweep file (CSV or JSON Lines, detected from the content) into raw cells.

Column names are normalised and every record keeps the line of the file it came from, so that
:mod:`noisescale.critical.sweepdata`, which interprets the cells, can name the line of any problem.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd

from noisescale.errors import SweepDataError

__all__ = ["read_table"]


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
