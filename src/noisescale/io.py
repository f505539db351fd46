"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

Every writer goes through :func:`atomic_open`: it writes to a temporary file in the
destination's directory (same file system), flushes and fsyncs it, then renames it
over the destination with :func:`os.replace`, which is atomic on POSIX and Windows.
If anything fails before the rename, the temporary file is deleted and an existing
destination is left untouched.

JSON is written strictly (``allow_nan=False``): non-finite floats become ``null``,
so that a value that is not resolved never shows up as ``NaN`` or ``Infinity``.

A resumable output directory (a sweep's, a branched measurement's) keeps its settings, a frozen
dataclass (:func:`settings_fields`, :func:`settings_to_dict`), in ``config.json``;
:func:`prepare_settings_dir` creates it or refuses other settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "VERSION_KEY",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "package_version",
    "prepare_settings_dir",
    "read_jsonl",
    "save_figure",
    "settings_fields",
    "settings_to_dict",
    "to_jsonable",
    "write_json",
    "write_jsonl",
]

VERSION_KEY = "noisescale_version"
"""The key of the package version written beside settings and records (not a setting)."""


def _default_mode() -> int:
    """Permission bits a plain ``open(path, "w")`` would give: 0o666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable by syncing its directory (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without error.

    Args:
        path: destination; its parent directory is created if missing.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        encoding: text encoding (ignored in binary mode).

    Yields:
        The open temporary file.

    Raises:
        ValueError: if ``mode`` is not ``"w"`` or ``"wb"``.
        OSError: if the directory cannot be written; nothing is left behind.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with atomic_open(Path(d) / "a.txt") as f:
        ...         _ = f.write("hello")
        ...     print((Path(d) / "a.txt").read_text())
        hello
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"expected `mode` 'w' or 'wb' but got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        mode_bits = path.stat().st_mode & 0o7777 if path.exists() else _default_mode()
        os.chmod(tmp, mode_bits)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types; non-finite floats become ``None``.

    Handles mappings, sequences, paths, numpy and 0-d torch scalars (anything with ``.item()``).

    Raises:
        TypeError: if some value has no JSON form.

    Example:
        >>> to_jsonable({"a": float("nan"), "b": (1.5, float("inf"))})
        {'a': None, 'b': [1.5, None]}
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return to_jsonable(obj.item())
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return to_jsonable(obj.tolist())
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON: convert it to numbers or strings first")


def package_version() -> str:
    """The installed version of noisescale, for the records a run writes ("unknown" when not installed).

    Read from the package metadata, so that no module imports the package root for it.
    """
    from importlib import metadata

    try:
        return metadata.version("noisescale")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON (non-finite floats as ``null``) atomically.

    Raises:
        TypeError: if ``obj`` holds a value with no JSON form; the destination is untouched.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Write one strict JSON object per line atomically (the whole file at once).

    Raises:
        TypeError: if a record holds a value with no JSON form; the destination is untouched.
    """
    with atomic_open(path, "w") as f:
        for record in records:
            f.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")


def read_jsonl(path: str | Path) -> list[Any]:
    """Read a JSON-lines file; a torn last line (a writer killed mid-append) is ignored.

    Raises:
        ValueError: if a line other than the last one is not valid JSON.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({exc})") from exc
    return records


def save_figure(fig: Figure, path: str | Path, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure atomically; the format comes from the file suffix.

    Args:
        fig: the figure.
        path: destination, e.g. ``noise_scale.png``.
        **savefig_kwargs: passed to ``Figure.savefig`` (``dpi``, ``bbox_inches``...).
    """
    path = Path(path)
    fmt = savefig_kwargs.pop("format", path.suffix.lstrip(".") or "png")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, **savefig_kwargs)


def settings_to_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a JSON-ready dict (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def settings_fields(
    cls: type, values: Mapping[str, Any], *, what: str, error: type[Exception]
) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from :func:`settings_to_dict` output (lists as tuples).

    The version :func:`prepare_settings_dir` writes beside the settings (``VERSION_KEY``) is
    skipped, so a saved ``config.json`` reads back as it is.

    Raises:
        error: on keys that are not fields of ``cls``, naming them and the fields.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in values.items() if k != VERSION_KEY}  # written beside the settings
    unknown = set(values) - names
    if unknown:
        raise error(f"unknown {what} settings {sorted(unknown)}: expected some of {sorted(names)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def prepare_settings_dir(
    out: str | Path,
    settings: Mapping[str, Any],
    *,
    what: str,
    error: type[Exception],
    subdir: str,
    defaults: Mapping[str, Any] | None = None,
) -> bool:
    """Create a resumable output directory with its ``config.json``, or check that it holds these settings.

    Stale temporary files of writes that were killed are removed from ``out/subdir``.

    Args:
        out: the directory.
        settings: JSON-ready settings; the saved ones must equal them (the version of
            noisescale that wrote them aside).
        what: what the directory holds, for the messages ("sweep").
        error: the exception to raise.
        subdir: the folder of the records, created too.
        defaults: the values of settings added since a directory may have been started, which
            a saved ``config.json`` without them holds (its runs used them).

    Returns:
        True when resuming (``config.json`` was already there).

    Raises:
        error: if ``out`` cannot be a directory (e.g. it is a file) or is not writable, or
            ``config.json`` holds other settings (the message lists those that differ) or cannot
            be read.
    """
    out = Path(out)
    path = out / "config.json"
    try:
        (out / subdir).mkdir(parents=True, exist_ok=True)
        for stale in (out / subdir).glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        if not path.exists():
            write_json(path, {**settings, VERSION_KEY: package_version()})
            return False
    except OSError as exc:
        why = "is a file, not a directory" if out.is_file() else f"cannot hold the {what} ({exc.strerror})"
        raise error(f"{out} {why}: choose another --out directory") from None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise error(f"{path}: cannot read the saved {what} configuration ({exc})") from exc
    saved.pop(VERSION_KEY, None)
    saved = {**json.loads(json.dumps(to_jsonable(defaults or {}))), **saved}
    mine = json.loads(json.dumps(to_jsonable(settings)))
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if diff:
        shown = "; ".join(f"{k}: saved {saved.get(k)!r}, asked {mine.get(k)!r}" for k in diff[:6])
        raise error(
            f"{out} holds another {what} ({shown}). Re-run with the saved settings to resume it, "
            "or choose another --out directory"
        )
    return True
