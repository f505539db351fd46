"""Load or run a script of examples/ (examples/ is not a package), and check what it prints."""

from __future__ import annotations

import importlib.util
import re
import runpy
from pathlib import Path
from types import ModuleType
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# How every example prints B_simple: rounded, in its unit, with its 95% interval.
B_SIMPLE = r"B_simple = [\d,.]+ (?:examples|tokens) \[[\d,.]+, [\d,.]+\] \(95%\)"
RAW_FLOAT = re.compile(r"\d\.\d{5,}")  # e.g. 307.32104327359593: never printed


def load(name: str) -> ModuleType:
    """``examples/<name>.py`` imported under the name ``example_<name>`` (its ``__main__`` block not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str) -> dict[str, Any]:
    """Run ``examples/<name>.py`` as ``python examples/<name>.py`` does, in this process; its globals."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
