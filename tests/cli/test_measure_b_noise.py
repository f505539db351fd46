"""``noisescale measure --b-noise`` and the FLOPs per example it records, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from noisescale.cli.measure import measure
from noisescale.cli.predict import predict

app = typer.Typer(pretty_exceptions_enable=False)
app.command()(measure)
app.command()(predict)


def _run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*map(str, args)])
    return result.exit_code, result.output


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_linreg_b_noise_matches_the_oracle_and_feeds_predict(tmp_path: Path) -> None:
    """Probes at steps 20 and 40 (200 batches of 16): within 4 standard errors of B_noise = 7.1407."""
    out = tmp_path / "linreg"
    code, text = _run(
        "measure", "--task", "linreg", "--steps", 40, "--threads", 1, "--no-progress", "--out", out,
        "--b-noise", "--b-noise-every", 20, "--b-noise-batches", 200,
    )  # fmt: skip
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    probe = summary["b_noise_probe"]
    assert probe["batches"] == 200 and probe["examples"] == 3200 and probe["microbatches"] == 4
    assert abs(summary["b_noise"] - summary["b_noise_true"]) < 4 * probe["b_noise_se"]
    assert summary["b_noise_true"] == pytest.approx(7.140705, abs=1e-6)
    assert summary["eps_max_true"] == pytest.approx(0.4519434, abs=1e-6)
    assert summary["b_noise_ci"] == probe["b_noise_ci"] and summary["eps_max"] == probe["eps_max"]
    assert summary["flops_per_example"] == 20.0  # Linear(5, 1): 2 x 5 forward, 2 x 5 for the weight gradient
    probed = [r["step"] for r in _records(out) if "b_noise" in r]
    assert probed == [20, 40]
    assert "B_noise (probe, 200 batches)" in text and "FLOPs per example" in text
    code, text = _run("predict", "--b-noise-from", out, "--batch-size", 16, "--json")
    assert code == 0, text
    lr = json.loads(text)["learning_rates"][0]["lr"]
    assert lr == pytest.approx(summary["eps_max"] / (1 + summary["b_noise"] / 16), rel=1e-12)


def test_probe_leaves_training_unchanged_and_records_flops(tmp_path: Path) -> None:
    """The probe draws from its own generator: the run's losses and B_simple are the same without it."""
    common = ["measure", "--task", "digits", "--steps", 6, "--threads", 1, "--no-progress"]
    assert _run(*common, "--out", tmp_path / "plain")[0] == 0
    code, text = _run(*common, "--out", tmp_path / "probed", "--b-noise", "--b-noise-batches", 4)
    assert code == 0, text
    keys = ("loss", "b_simple", "grad_norm_sq")
    plain, probed = _records(tmp_path / "plain"), _records(tmp_path / "probed")
    assert [[r[k] for k in keys] for r in plain] == [[r[k] for k in keys] for r in probed]
    assert [r["step"] for r in probed if "b_noise" in r] == [1, 2, 3, 4, 5, 6]  # every max(1, 6 // 4) steps
    summary = json.loads((tmp_path / "probed" / "summary.json").read_text())
    assert summary["flops_per_example"] == 2 * (64 * 64 + 64 * 10) + 2 * 64 * 64 + 4 * 64 * 10  # 20,224
    assert summary["b_noise_batches"] == 4 and "b_noise_probe" in summary


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--b-noise-batches", 0], "--b-noise-batches must be at least 1, got 0"),
        (["--b-noise-every", 0], "--b-noise-every must be at least 1, got 0"),
        (["--batch-size", 2, "--microbatches", 1], "the batch size 2 is too small (use --batch-size 4"),
    ],
    ids=["batches", "every", "small_batch"],
)
def test_bad_probe_options_get_one_line_errors(tmp_path: Path, args: list, match: str) -> None:
    code, text = _run("measure", "--task", "linreg", "--steps", 2, "--no-progress", "--out", tmp_path,
                      "--b-noise", *args)  # fmt: skip
    assert code == 2 and match in text and "Traceback" not in text
