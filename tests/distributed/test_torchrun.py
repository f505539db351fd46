"""examples/torchrun_ddp.py under ``torchrun --standalone --nproc_per_node=2``: rank 0 alone reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integrations.examples import B_SIMPLE

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_example_uses_the_ddp_method() -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "examples" / "torchrun_ddp.py"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("method=")]
    assert len(lines) == 1  # rank 0 only
    assert re.fullmatch(rf"method=ddp world_size=2: {B_SIMPLE} after 60 steps", lines[0])


def test_ddp_overhead_benchmark_runs(tmp_path: Path) -> None:
    """The benchmark's smallest configuration runs and writes its JSON (no timing asserted)."""
    out = tmp_path / "ddp_overhead.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ddp_overhead.py"), "--width", "32", "--batch", "8",
           "--steps", "2", "--repeats", "2", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for clock in ("wall", "cpu"):
        assert set(result[clock]["median_step_s"]) == {"plain", "reads", "noisescale", "every_step"}
        for key in ("ratio_of_medians", "reads_ratio_of_medians", "every_step_ratio_of_medians"):
            assert result[clock][key] > 0
    assert "noisescale ratio" in done.stdout


def _measure(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "noisescale", "measure", "--task", "shakespeare", "--steps", "3", "--batch-size", "512",
           "--no-progress", "--threads", "1", "--out", str(tmp_path / "out"), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)


def test_torchrun_measures_the_language_model_in_tokens(tmp_path: Path) -> None:
    """Under torchrun the micro-batch sizes are tokens too; per-example in tokens is refused with the fix."""
    done = _measure(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["method"], summary["world_size"], summary["unit"]) == ("ddp", 2, "tokens")
    assert summary["examples"] == 3 * 512 and summary["microbatches"] == 4
    refused = _measure(tmp_path, "--method", "per-example")  # each rank exits with 2, torchrun with 1
    assert refused.returncode != 0
    assert "under torchrun a task in tokens is measured with --method ddp" in refused.stderr
