"""The README's `noisescale fit sweep.csv` example runs on the file shipped in examples/."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from noisescale.cli.app import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sweep.csv"


def test_readme_fit_example_runs_on_the_shipped_sweep(tmp_path: Path) -> None:
    # examples/sweep.csv is the results.csv of `noisescale sweep --task digits --jobs 2` (seed 0).
    table = pd.read_csv(EXAMPLE)
    assert set(table["unit"]) == {"images"} and set(table["metric"]) == {"train_loss", "test_error"}
    res = CliRunner().invoke(app, ["fit", str(EXAMPLE), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.stderr
    assert "batch sizes in images" in res.stdout and "train loss 0.5" in res.stdout
    assert (tmp_path / "sweep.pareto.png").exists() and (tmp_path / "sweep.b_crit_test_error.png").exists()
    report = json.loads(CliRunner().invoke(app, ["fit", str(EXAMPLE), "--json", "--no-plots"]).stdout)
    assert [g["metric"] for g in report["goals"]] == ["train_loss", "train_loss", "test_error"]
    assert all(g["b_crit"] is not None for g in report["goals"][:2])
