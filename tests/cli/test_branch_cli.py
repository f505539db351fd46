"""``noisescale branch`` end to end on a tiny digits measurement, through the real command-line app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from noisescale.cli.app import app

runner = CliRunner()

TINY = [
    "branch",
    "--task",
    "digits",
    "--batch-size",
    "8",
    "--kappa",
    "1",
    "--kappa",
    "2",
    "--kappa",
    "4",
    "--at",
    "0",
    "--at",
    "64",
    "--at",
    "128",
    "--window",
    "128",
    "--checks",
    "4",
    "--replicas",
    "2",
    "--max-examples",
    "256",
    "--read-at-loss",
    "2.29",
    "--bootstrap",
    "200",
    "--no-progress",
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("cli") / "branch"
    result = runner.invoke(app, [*TINY, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out, result.stdout, result.stderr


def test_branch_prints_a_table_and_writes_its_files(measured: tuple[Path, str, str]) -> None:
    out, stdout, stderr = measured
    for name in ("config.json", "base.json", "branch.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "branch.png").read_bytes()[:4] == b"\x89PNG"
    for text in (
        "branched critical batch size: digits",
        "batch sizes in images",
        "images seen",
        "B_simple",
        "B_crit",
        "B_crit from init",
        "examples ratio against B",
        "B_crit from init at the loss 2.29 (reached at 56 images",
    ):
        assert text in stdout
    assert "18 branches trained now" in stderr and "spent 2.43k images (base 128, branches 2.3k)" in stderr


def test_json_prints_branch_json_and_a_rerun_resumes(measured: tuple[Path, str, str]) -> None:
    out, _, _ = measured
    result = runner.invoke(app, [*TINY, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    assert "0 branches trained now" in result.stderr
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "branch.json").read_text())
    for point in printed["points"]:
        assert {"examples", "loss", "b_crit", "b_crit_ci", "bound", "b_simple", "b_crit_cumulative"} <= set(
            point
        )
        cumulative = ("ci", "bound", "note", "bracket")
        assert {f"b_crit_cumulative_{name}" for name in cumulative} <= set(point)
    assert printed["unit"] == "images"


def test_other_settings_in_the_same_directory_are_refused(measured: tuple[Path, str, str]) -> None:
    out, _, _ = measured
    result = runner.invoke(app, [*TINY, "--out", str(out), "--replicas", "3"])
    assert result.exit_code == 2
    assert "holds another branched measurement (replicas: saved 2, asked 3)" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kappa", "3"], "must increase and start at 1"),
        (["--window", "0"], "window 0 is not a positive multiple"),
        (["--window", "100"], "use 96"),
        (["--at", "60"], "use 56 or 64"),
        (["--tolerance", "-1"], "tolerance >= 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, extra: list[str], message: str) -> None:
    result = runner.invoke(app, [*TINY, "--out", str(tmp_path / "x"), *extra])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
