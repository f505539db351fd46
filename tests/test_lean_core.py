"""The core installs with torch, numpy and scipy alone (`pip install noisescale`, issue 12 #6).

Each check runs in a fresh interpreter where importing pandas, matplotlib, rich or typer raises,
as it would where the `cli` extra is not installed.
"""

import subprocess
import sys
import textwrap

import pytest

BLOCKED = ("pandas", "matplotlib", "rich", "typer")

_BLOCKER = f"""
import importlib.abc, sys
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: the core must not need it")
        return None
sys.meta_path.insert(0, _Blocker())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    script = _BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_blocker_blocks() -> None:
    result = _run("import pandas")
    assert result.returncode != 0
    assert "pandas is blocked" in result.stderr


@pytest.mark.parametrize(
    "module",
    [
        "noisescale",
        "noisescale.meter",
        "noisescale.estimators",
        "noisescale.distributed",
        "noisescale.critical.fit",
        "noisescale.critical.predict",
        "noisescale.control",
    ],
)
def test_core_imports_without_cli_extra(module: str) -> None:
    result = _run(f"import {module}")
    assert result.returncode == 0, result.stderr


def test_meter_measures_without_cli_extra() -> None:
    # A full measure -> compute cycle on a tiny model: nothing on the meter's path needs the extra.
    result = _run(
        """
        import torch
        import noisescale
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        meter = noisescale.GradientNoiseScale(model, method="microbatch")
        for _ in range(5):
            for xb in torch.randn(2, 8, 4):
                (model(xb).square().mean() / 2).backward()
            meter.update(batch_size=16)
            model.zero_grad()
        est = meter.compute()
        assert est.steps == 5, est
        print("ok", est.grad_norm_sq > 0)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
