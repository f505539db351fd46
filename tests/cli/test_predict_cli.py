"""``noisescale predict``: the learning rate for a batch (eq. 2.6), compute in PF-days, C/C_min and time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from noisescale.cli.predict import predict

app = typer.Typer()
app.command()(predict)
app.command("unused")(lambda: None)  # two commands: typer keeps the subcommand name
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, ["predict", *map(str, args)])


def test_compute_time_and_learning_rate_against_hand_formulas() -> None:
    s_min, b_crit, flops, tput = 1200.0, 835.0, 1.2e6, 5e4
    res = invoke(
        "--b-crit", b_crit, "--s-min", s_min, "--batch-size", 512, "--batch-size", 2048,
        "--flops-per-example", flops, "--throughput", tput, "--devices", 8,
        "--eps-max", 0.45, "--b-noise", 300, "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for b, row in zip([512, 2048], out["predictions"][0]["rows"], strict=True):
        examples = s_min * b_crit * (1 + b / b_crit)
        assert row["flops"] == pytest.approx(flops * examples, rel=1e-12)
        assert row["pf_days"] == pytest.approx(flops * examples / 8.64e19, rel=1e-12)
        assert row["compute_ratio"] == pytest.approx(1 + b / b_crit, rel=1e-12)
        assert row["time_s"] == pytest.approx(examples / (tput * 8), rel=1e-12)
        assert row["lr"] == pytest.approx(0.45 / (1 + 300 / b), rel=1e-12)
    assert out["compute"] == {
        "flops_per_example": flops, "pf_day_flops": 8.64e19, "throughput": tput, "devices": 8
    }  # fmt: skip
    text = invoke("--b-crit", b_crit, "--s-min", s_min, "--batch-size", 512, "--flops-per-example", flops,
                  "--throughput", tput).output  # fmt: skip
    assert "PF-days" in text and "C/C_min" in text and "1 PF-day = 8.64e+19 FLOPs" in text
    assert "1.61" in text and "32.3 s" in text  # 1 + 512/835; 1.62M examples at 50k/s


def test_learning_rate_alone_from_a_measure_run(tmp_path: Path) -> None:
    """The oracle's eps_opt(16) = 0.3124837 (SCIENCE.md) from a run's summary.json."""
    run = tmp_path / "run"
    run.mkdir()
    summary = {"unit": "examples", "b_noise": 7.140705, "eps_max": 0.4519434, "b_noise_reason": None}
    (run / "summary.json").write_text(json.dumps(summary))
    out = json.loads(invoke("--b-noise-from", run, "--batch-size", 16, "--json").stdout)
    assert out["learning_rates"] == [{"batch_size": 16.0, "lr": pytest.approx(0.3124837, abs=1e-7)}]
    assert out["learning_rate"]["run"] == str(run) and out["predictions"] == []
    text = invoke("--b-noise-from", run / "summary.json").output  # powers of two around B_noise
    assert "learning rate" in text and "0.312" in text and "B_noise = 7.14 examples" in text


@pytest.mark.parametrize(
    ("summary", "args", "match"),
    [
        ({"unit": "examples", "b_noise": None, "eps_max": None, "b_noise_reason": "G^T H G is -1"},
         [], "not both resolved (G^T H G is -1)"),
        ({"unit": "examples", "b_simple": 7.4}, [], "has no b_noise: measure with `noisescale measure"),
        ({"unit": "images", "b_noise": 7.0, "eps_max": 0.4}, ["--unit", "tokens"],
         "gives B_noise in images, the batch sizes are in tokens"),
        ({"unit": "examples", "b_noise": 7.0, "eps_max": 0.4}, ["--eps-max", "1", "--b-noise", "2"],
         "not both"),
    ],
    ids=["unresolved", "not_a_b_noise_run", "unit", "two_sources"],
)  # fmt: skip
def test_bad_runs_get_one_line_errors(tmp_path: Path, summary: dict, args: list, match: str) -> None:
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    res = invoke("--b-noise-from", tmp_path, *args)
    assert res.exit_code == 2 and match in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--eps-max", "0.4"], "give both --eps-max and --b-noise"),
        (["--flops-per-example", "1e6", "--eps-max", "1", "--b-noise", "2"], "need B_crit"),
        (["--b-crit", "800", "--throughput", "-5"], "`throughput` to be positive"),
        (["--b-crit", "800", "--eps-max", "0", "--b-noise", "2"], "`eps_max` to be positive"),
        (["--b-crit", "800", "--throughput", "5", "--devices", "0"], "Invalid value for '--devices'"),
        (["--b-crit", "800", "--devices", "8"], "give --throughput too"),  # ignored silently before
        (["--b-noise-from", "no/such/run"], "cannot read a summary.json"),
    ],
    ids=[
        "half_pair",
        "flops_without_b_crit",
        "throughput",
        "eps_max",
        "devices",
        "devices_alone",
        "missing_run",
    ],
)
def test_bad_options_get_one_line_errors(args: list, match: str) -> None:
    res = invoke(*args)
    assert res.exit_code == 2 and match in res.output and "Traceback" not in res.output
