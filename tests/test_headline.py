"""benchmarks/headline.py on small finished sweeps: the table, the figure, missing tasks and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from noisescale.experiments.sweep import SweepConfig, run_sweep
from tests.test_benchmarks_smoke import load_benchmark

headline = load_benchmark("headline")

LINREG = {"max_widenings": 0}  # the default grid (2 to 128 examples), 12 runs of a fraction of a second
CARTPOLE = {"batch_sizes": [32, 64, 128], "return_goals": [30.0, 60.0], "seeds": 2, "lr_points": 1,
            "max_widenings": 0, "max_steps": 400, "max_examples": 20_000, "min_steps": 40}  # fmt: skip


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for task, settings in (("linreg", LINREG), ("cartpole", CARTPOLE)):
        path = tmp_path_factory.mktemp(task)
        run_sweep(SweepConfig.for_task(task, **settings), path, n_bootstrap=100)
        out[task] = path
    return out


def test_table_and_figure_from_finished_sweeps(sweeps: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    png = tmp_path / "headline.png"
    assert headline.main([str(sweeps["linreg"]), str(sweeps["cartpole"]), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"task", "linreg", "digits", "mnist", "fashion-mnist", "shakespeare", "cartpole"}
    fit = json.loads((sweeps["linreg"] / "fit.json").read_text())
    goal = [g for g in fit["goals"] if g["b_crit"] is not None][-1]  # the hardest with a B_crit
    assert f"train loss {goal['goal']:g}" in rows["linreg"]
    assert headline._num(goal["b_crit"]) in rows["linreg"] and "| examples |" in rows["linreg"]
    ratio = goal["b_simple"]["median"] / goal["b_crit"]
    assert f"| {ratio:.2g} |" in rows["linreg"]
    assert "| observations | mean return" in rows["cartpole"] and "Atari" in rows["cartpole"]
    for task in ("digits", "mnist", "fashion-mnist", "shakespeare"):
        assert "no finished sweep" in rows[task]  # listed, never invented
    assert "missing (no finished sweep given): mnist, fashion-mnist, digits, shakespeare" in text


def test_the_sweep_time_is_the_sum_of_its_runs_over_two_cores(sweeps: dict[str, Path]) -> None:
    sweep = headline.load_sweep_dir(sweeps["linreg"])
    records = [json.loads(p.read_text()) for p in (sweeps["linreg"] / "runs").glob("*.json")]
    assert sweep.runs == len(records) == 12
    assert sweep.run_seconds == pytest.approx(sum(r["wall_time_s"] for r in records))


def test_an_unfinished_sweep_is_refused_naming_the_command(sweeps: dict[str, Path], tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(sweeps["linreg"], partial)
    next((partial / "runs").glob("*.json")).unlink()
    message = r"not finished \(1 runs still planned\).*noisescale sweep --task linreg"
    with pytest.raises(ValueError, match=message):
        headline.load_sweep_dir(partial)
    (partial / "fit.json").unlink()
    shutil.copy(next((sweeps["linreg"] / "runs").glob("*.json")), partial / "runs")
    with pytest.raises(ValueError, match=r"no fit\.json"):
        headline.load_sweep_dir(partial)


def test_bad_input_is_one_line(sweeps: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    assert headline.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) == 2
    assert "is not a directory of `noisescale sweep`" in capsys.readouterr().err
    twice = [str(sweeps["linreg"]), str(sweeps["linreg"]), "--out", str(tmp_path / "x.png")]
    assert headline.main(twice) == 2
    assert "two sweeps of linreg" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
