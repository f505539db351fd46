"""``noisescale sweep`` end to end on tiny sweeps, through the real command-line app."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from noisescale.cli import common
from noisescale.cli import measure as measure_cli
from noisescale.cli import sweep as sweep_cli
from noisescale.cli.app import app
from noisescale.experiments.optim import OPTIMIZERS
from noisescale.experiments.rl import RL_TASK_NAMES
from noisescale.experiments.sweep.run import EXECUTORS
from noisescale.experiments.tasks import TASK_NAMES
from noisescale.experiments.training import ONLY
from noisescale.options import METHODS, SINGLE_PROCESS_METHODS

runner = CliRunner()

# linreg: three batch sizes, two learning rates each, two loss goals above the floor 0.245.
TINY = ["sweep", "--task", "linreg", "--batch-size", "2", "--batch-size", "8", "--batch-size", "32",
        "--loss-goal", "0.6", "--loss-goal", "0.35", "--lr-points", "2", "--max-widenings", "1",
        "--max-steps", "300", "--jobs", "1", "--bootstrap", "200", "--no-progress"]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("cli") / "sweep"
    result = runner.invoke(app, [*TINY, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out, result.stdout, result.stderr


def test_sweep_writes_results_fit_and_plots(swept: tuple[Path, str, str]) -> None:
    out, stdout, stderr = swept
    for name in ("config.json", "results.csv", "fit.json"):
        assert (out / name).stat().st_size > 0
    for name in ("pareto.png", "b_crit.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not (out / "pareto_test_error.png").exists()  # linreg has no test error
    table = pd.read_csv(out / "results.csv")
    assert set(table["goal"]) == {0.6, 0.35} and set(table["batch_size"]) == {2, 8, 32}
    fit = json.loads((out / "fit.json").read_text())
    assert {g["goal"] for g in fit["goals"]} == {0.6, 0.35}
    for g in fit["goals"]:
        assert {"b_crit", "b_crit_ci", "bound", "s_min", "e_min", "b_simple", "b_simple_over_b_crit"} <= set(
            g
        )
    assert json.loads((out / "config.json").read_text())["task"] == "linreg"
    for column in ("goal", "B_crit", "S_min", "E_min", "B_simple", "B_simple/B_crit"):
        assert column in stdout
    assert "train loss 0.35" in stdout
    assert "trained now" in stderr and "results.csv" in stderr


def test_rerunning_the_command_resumes_without_training(swept: tuple[Path, str, str]) -> None:
    out, _, _ = swept
    before = (out / "results.csv").read_text()
    runs = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    result = runner.invoke(app, [*TINY, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "(0 trained now)" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == runs
    assert (out / "results.csv").read_text() == before


def test_results_are_readable_by_noisescale_fit(swept: tuple[Path, str, str]) -> None:
    out, _, _ = swept
    result = runner.invoke(
        app, ["fit", str(out / "results.csv"), "--json", "--no-plots", "--bootstrap", "200"]
    )
    assert result.exit_code == 0, result.stderr
    assert [g["goal"] for g in json.loads(result.stdout)["goals"]] == [0.6, 0.35]


def test_other_settings_in_the_same_directory_are_refused(swept: tuple[Path, str, str]) -> None:
    out, _, _ = swept
    result = runner.invoke(app, [*TINY, "--out", str(out), "--max-steps", "400"])
    assert result.exit_code == 2
    assert "holds another sweep" in result.stderr and "max_steps" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--batch-size", "8", "--batch-size", "16"], "at least 3 batch sizes", id="two_batches"),
        pytest.param(["--error-goal", "2"], "fractions", id="error_goal"),
        pytest.param(["--method", "microbatch", "--microbatches", "1"], "at least 2 micro-batches", id="k1"),
        pytest.param(["--microbatches", "0"], "`microbatches` >= 1", id="k0"),
        pytest.param(["--batch-size", "0", "--batch-size", "8", "--batch-size", "32"], "batch sizes >= 2",
                     id="zero_batch"),
        pytest.param(["--batch-size", "-8", "--batch-size", "8", "--batch-size", "32"], "batch sizes >= 2",
                     id="negative_batch"),
        pytest.param(["--batch-size", "8", "--batch-size", "32", "--batch-size", "1000000000"],
                     "above the example budget", id="huge_batch"),
        pytest.param(["--lr-max", "nan"], "finite lr_max > 0", id="lr_max_nan"),
        pytest.param(["--lr-max", "0"], "finite lr_max > 0", id="lr_max_zero"),
        pytest.param(["--lr-step", "inf"], "lr_step > 1", id="lr_step_inf"),
        pytest.param(["--lr-points", "0"], "lr_points >= 1", id="empty_lr_grid"),
        pytest.param(["--max-widenings", "-1"], "max_widenings >= 0", id="widenings"),
        pytest.param(["--loss-goal", "-1"], "loss goals must be positive", id="loss_goal"),
        pytest.param(["--max-steps", "0", "--min-steps", "0"], "at least 1", id="no_steps"),
        pytest.param(["--seed", "-1"], "0 <= seed", id="seed"),
        pytest.param(["--error-goal", "0.1", "--no-error-goal"], "not both", id="error_goal_twice"),
    ],
)  # fmt: skip
def test_bad_options_exit_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", "--task", "linreg", "--no-progress", "--out", str(out), *args])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()  # refused before the sweep directory, let alone a run


@pytest.mark.parametrize(
    ("args", "option"),
    [
        pytest.param(["--confidence", "2"], "--confidence", id="confidence"),
        pytest.param(["--confidence", "nan"], "--confidence", id="confidence_nan"),
        pytest.param(["--bootstrap", "5"], "--bootstrap", id="bootstrap"),  # fewer than 100 resamples
        pytest.param(["--jobs", "0"], "--jobs", id="jobs"),
        pytest.param(["--task", "imagenet"], "--task", id="task"),
        pytest.param(["--method", "ddp"], "--method", id="ddp"),
    ],
)
def test_bad_option_values_are_usage_errors(tmp_path: Path, args: list[str], option: str) -> None:
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", "--task", "linreg", "--no-progress", "--out", str(out), *args])
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_bootstrap_minimum_is_in_the_help() -> None:
    assert ">= 100" in runner.invoke(app, ["sweep", "--help"]).stdout


def test_out_that_is_a_file_is_refused_before_training(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("something else")
    result = runner.invoke(app, [*TINY, "--out", str(taken)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        result.stderr.strip() == f"error: {taken} is a file, not a directory: choose another --out directory"
    )
    assert taken.read_text() == "something else"


def test_subcommands_share_the_option_choices() -> None:
    assert sweep_cli.TaskName is measure_cli.TaskName is common.TaskName
    assert [m.value for m in common.MethodName] == ["per-example", "microbatch", "ddp", "fsdp"]  # measure
    assert [m.value for m in common.SweepMethodName] == ["per-example", "microbatch"]  # one process per run


def test_option_choices_spell_the_library_names_in_order() -> None:
    # The enums are written out for mypy; they must stay the command-line spellings of the library's lists.
    def spelled(names: tuple[str, ...]) -> list[tuple[str, str]]:
        return [(n.replace("-", "_"), n.replace("_", "-")) for n in names]

    assert [(m.name, m.value) for m in common.TaskName] == spelled(TASK_NAMES + RL_TASK_NAMES)
    assert [(m.name, m.value) for m in common.MethodName] == spelled(METHODS)
    assert [(m.name, m.value) for m in common.SweepMethodName] == spelled(SINGLE_PROCESS_METHODS)
    assert [(m.name, m.value) for m in common.OptimizerName] == spelled(OPTIMIZERS)
    assert [(m.name, m.value) for m in common.ExecutorName] == spelled(EXECUTORS)
    assert [m.value for m in common.OnlyName] == ["all", *[o for o in ONLY if o]]
    assert common.DEFAULT_TASK.value == "mnist"


@pytest.mark.slow
def test_classification_sweep_has_test_error_goal_plots(tmp_path: Path) -> None:
    args = ["sweep", "--task", "digits", "--batch-size", "16", "--batch-size", "64", "--batch-size", "256",
            "--loss-goal", "0.5", "--loss-goal", "0.3", "--error-goal", "0.12", "--lr-points", "1",
            "--max-steps", "300", "--jobs", "1", "--bootstrap", "200", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    for name in ("pareto.png", "b_crit.png", "pareto_test_error.png", "b_crit_test_error.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    table = pd.read_csv(tmp_path / "results.csv")
    assert set(table["metric"]) == {"train_loss", "test_error"}
    assert "test error 0.12" in result.stdout

    # Issue 12, done when: `noisescale fit <dir>/results.csv --json` reproduces the sweep's own
    # fit.json exactly, every goal with its metric, B_crit, interval, S_min, power law and unit.
    args = ["fit", str(tmp_path / "results.csv"), "--json", "--no-plots", "--bootstrap", "200"]
    fit = runner.invoke(app, args)
    assert fit.exit_code == 0, fit.stderr
    assert fit.stdout == (tmp_path / "fit.json").read_text()
    report = json.loads(fit.stdout)
    # Issue 13 #7: the metric column is respected, the unit is the task's, and B_crit(L) is never
    # fitted across metrics (two loss goals: too few for the law; the error goal is not counted).
    assert report["unit"] == "images" and set(table["unit"]) == {"images"}
    assert [(g["metric"], g["goal"]) for g in report["goals"]] == [
        ("train_loss", 0.5), ("train_loss", 0.3), ("test_error", 0.12)
    ]  # fmt: skip
    bracketed = sum(g["metric"] == "train_loss" and g.get("b_crit") is not None for g in report["goals"])
    assert report["power_law"] is None and f"got {bracketed}" in report["power_law_note"]


def test_validation_loss_goals_reach_the_sweep(tmp_path: Path) -> None:
    """--val-loss-goal sets the held-out goals (checked before any run: a negative level is refused)."""
    result = runner.invoke(
        app, ["sweep", "--task", "shakespeare", "--val-loss-goal", "-1", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "loss goals must be positive and finite, got [-1.0]" in result.stderr
    assert not list(tmp_path.iterdir())
