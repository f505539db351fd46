"""Atomic writes: the destination holds the old content or the new one, never a partial file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from noisescale import io


def _leftovers(directory: Path) -> list[str]:
    """Temporary files left in ``directory`` (they start with a dot and end in .tmp)."""
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def _write_then_fail(path: Path, mode: str, payload: str | bytes) -> None:
    """Start an atomic write, write part of it, then fail as a crash would."""
    with io.atomic_open(path, mode) as f:
        f.write(payload)
        raise RuntimeError("disk on fire")


def test_atomic_write_text_creates_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.txt"
    io.atomic_write_text(path, "one")
    io.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert _leftovers(path.parent) == []


def test_new_file_gets_umask_permissions(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    io.atomic_write_text(path, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_existing_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old content")
    with pytest.raises(RuntimeError, match="disk on fire"):
        _write_then_fail(path, "w", "new partial content")
    assert path.read_text() == "old content"
    assert _leftovers(tmp_path) == []


def test_failed_first_write_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    with pytest.raises(RuntimeError, match="disk on fire"):
        _write_then_fail(path, "wb", b"partial")
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_rejects_append_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'w' or 'wb'"), io.atomic_open(tmp_path / "a", "a"):
        pass


def test_write_json_is_strict_and_maps_non_finite_to_null(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    io.write_json(path, {"b": float("nan"), "ci": (1.0, float("inf")), "p": tmp_path, "ok": True})
    loaded = json.loads(path.read_text())
    assert loaded == {"b": None, "ci": [1.0, None], "p": str(tmp_path), "ok": True}


def test_write_json_unserialisable_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    io.write_json(path, {"a": 1})
    with pytest.raises(TypeError, match="cannot write a object as JSON"):
        io.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert _leftovers(tmp_path) == []


def test_jsonl_round_trip_and_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    records = [{"step": i, "b_simple": None if i == 0 else 10.0 * i} for i in range(3)]
    io.write_jsonl(path, records)
    assert io.read_jsonl(path) == records
    with path.open("a") as f:
        f.write('{"step": 3, "b_sim')  # a writer killed mid-line
    assert io.read_jsonl(path) == records


def test_read_jsonl_rejects_corrupt_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        io.read_jsonl(path)


def test_save_figure_writes_png(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    io.save_figure(fig, tmp_path / "f.png")
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_figure_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.png"
    path.write_bytes(b"old")
    fig, _ = plt.subplots()

    def broken_savefig(f, **kwargs) -> None:
        f.write(b"\x89PNG partial")
        raise OSError("renderer crashed")

    monkeypatch.setattr(fig, "savefig", broken_savefig)
    with pytest.raises(OSError, match="renderer crashed"):
        io.save_figure(fig, path)
    plt.close(fig)
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []
