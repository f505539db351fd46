"""The sweep engine: learning-rate grids and widening, run records, resume after a kill, parallel jobs.

Every sweep here trains ``linreg`` (noisy linear regression, fresh Gaussian data each step) on
tiny grids, so each run takes a fraction of a second; the slow tests start real processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from noisescale import io as nsio
from noisescale.critical import plotting as plotting_critical
from noisescale.critical.sweepdata import load_sweep
from noisescale.errors import NoiseScaleError, SweepConfigError
from noisescale.experiments.sweep import (
    CurvePoint,
    GoalRecord,
    RunRecord,
    RunSpec,
    SweepConfig,
    best_lr_index,
    load_records,
    lr_rule,
    plan_widening,
    prepare_sweep_dir,
    results_table,
    run_sweep,
    write_results,
)

# Three batch sizes, two learning rates each (0.5x and 1x the rule), two reachable loss goals
# (the loss floor of linreg is sigma^2/2 = 0.245): a dozen runs of at most 300 steps.
TINY = {
    "batch_sizes": [2, 8, 32],
    "loss_goals": [0.6, 0.35],
    "lr_points": 2,
    "max_steps": 300,
    "eval_examples": 512,
    "max_widenings": 1,
}


def tiny(**overrides: Any) -> SweepConfig:
    return SweepConfig.for_task("linreg", **{**TINY, **overrides})


def run_files(out: Path) -> dict[str, float]:
    """Record name -> modification time (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}


def without_wall_time(records: dict[RunSpec, RunRecord]) -> dict[RunSpec, RunRecord]:
    return {k: dataclasses.replace(r, wall_time_s=0.0) for k, r in records.items()}


LEVELS = (("train_loss", 0.6), ("train_loss", 0.35))


def fake_record(
    batch: int,
    index: int,
    steps: list[int | None],
    stopped: str = "goals",
    *,
    steps_run: int | None = None,
    goals: tuple[tuple[str, float], ...] = LEVELS,
) -> RunRecord:
    """A run whose checks meet goal k exactly at steps[k] (None: never), from losses 1.0 / errors 0.9."""
    run = steps_run or (100 if None in steps else max(s for s in steps if s is not None))
    values = {"train_loss": 1.0, "test_error": 0.9}
    curve = [CurvePoint(0, **values)]
    for step in sorted({s for s in steps if s is not None}):
        values.update({m: level for (m, level), s in zip(goals, steps, strict=True) if s == step})
        curve.append(CurvePoint(step, **values))
    if curve[-1].step < run:
        curve.append(CurvePoint(run, **values))
    return RunRecord(
        name=f"{batch}_{index}", batch_size=batch, lr=0.1 * 2.0**index, lr_index=index, seed=0,
        unit="examples", steps_budget=run, steps_run=run, examples_run=run * batch, stopped=stopped,
        goals=tuple(
            GoalRecord(m, level, s is not None, s, None, None, None)
            for (m, level), s in zip(goals, steps, strict=True)
        ),
        b_simple=None, b_simple_ratio=None, final_train_loss=1.0, curve=tuple(curve), wall_time_s=0.0,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Configuration and the learning-rate grid
# ---------------------------------------------------------------------------------------------


def test_lr_rule_is_linear_then_flat() -> None:
    # eps(B) = eps_max / (1 + B*/B) (McCandlish et al. 2018, eq. 2.6): eps_max/2 at B = B*.
    assert lr_rule(64, 1.0, 64) == pytest.approx(0.5)
    assert lr_rule(1, 1.0, 1000) == pytest.approx(1 / 1001)
    assert lr_rule(1e9, 1.0, 64) == pytest.approx(1.0, rel=1e-6)
    assert lr_rule(64, 1.0, 64, alpha=0.5) == pytest.approx(0.5**0.5)


def test_learning_rate_grid_is_centred_on_the_rule() -> None:
    cfg = SweepConfig.for_task("linreg", lr_max=1.0, lr_b_star=8.0, lr_points=3, lr_step=2.0)
    assert list(cfg.base_lr_indices()) == [-1, 0, 1]
    assert [cfg.learning_rate(8, i) for i in (-1, 0, 1)] == pytest.approx([0.25, 0.5, 1.0])
    assert list(tiny().base_lr_indices()) == [-1, 0]
    assert RunSpec(8, 0).name(cfg) == "8_0.5"


def test_config_round_trip_and_goals() -> None:
    cfg = SweepConfig.for_task("mnist")
    assert SweepConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.goals[0].metric == "train_loss" and cfg.goals[-1].metric == "test_error"
    assert list(cfg.loss_goals) == sorted(cfg.loss_goals, reverse=True)  # easiest first
    budget = SweepConfig.for_task("linreg", max_steps=1000, max_examples=10_000, min_steps=100).budget
    assert [budget(b) for b in (2, 8, 32, 128)] == [1000, 1000, 313, 100]  # examples / B, clipped


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"batch_sizes": [8, 16]}, "at least 3 batch sizes", id="too_few_batches"),
        pytest.param({"loss_goals": [], "error_goals": []}, "at least one goal", id="no_goal"),
        pytest.param({"error_goals": [1.5]}, "fractions", id="error_goal_not_fraction"),
        pytest.param({"error_goals": [0.1]}, "not a classification task", id="error_goal_regression"),
        pytest.param({"lr_step": 1.0}, "lr_step > 1", id="lr_step"),
        pytest.param({"min_steps": 2000}, "min_steps <= max_steps", id="min_steps"),
        pytest.param({"nonsense": 1}, "unknown sweep settings", id="unknown_key"),
        pytest.param({"lr_max": float("nan")}, "finite lr_max > 0", id="lr_max_nan"),
        pytest.param({"lr_step": float("inf")}, "lr_step > 1", id="lr_step_inf"),
        pytest.param({"lr_b_star": -1.0}, "lr_b_star >= 0", id="lr_b_star_negative"),
        pytest.param({"loss_goals": [float("nan")]}, "loss goals must be positive and finite", id="loss_nan"),
        pytest.param({"loss_goals": [-0.5]}, "loss goals must be positive", id="loss_negative"),
        pytest.param({"eval_growth": float("nan")}, "eval_growth > 1", id="eval_growth_nan"),
        pytest.param({"batch_sizes": [2, 8, 10**9]}, "above the example budget", id="batch_over_budget"),
        pytest.param({"method": "ddp"}, "one process", id="ddp"),
        pytest.param({"method": "adam"}, "'per-example', 'microbatch' but got 'adam'", id="unknown_method"),
        pytest.param({"method": "microbatch", "microbatches": 1}, "at least 2 micro-batches", id="k1"),
        pytest.param({"microbatches": 0}, "`microbatches` >= 1", id="k0"),
        pytest.param({"momentum": -0.5}, "momentum >= 0", id="momentum"),
        pytest.param({"seed": -1}, "0 <= seed", id="seed"),
    ],
)
def test_invalid_configs_say_what_to_change(overrides: dict, message: str) -> None:
    with pytest.raises(SweepConfigError, match=message):
        SweepConfig.for_task("linreg", **overrides)


def test_sweep_config_error_is_a_project_error() -> None:
    assert issubclass(SweepConfigError, NoiseScaleError) and issubclass(SweepConfigError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"n_bootstrap": 5}, "n_bootstrap` >= 100", id="bootstrap"),
        pytest.param({"confidence": 2.0}, r"confidence` in \(0, 1\)", id="confidence"),
        pytest.param({"confidence": float("nan")}, "confidence", id="confidence_nan"),
    ],
)
def test_bad_fit_settings_are_refused_before_any_run(tmp_path: Path, kwargs: dict, message: str) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(SweepConfigError, match=message):
        run_sweep(tiny(), out, **kwargs)
    assert not out.exists()


def test_a_file_is_not_a_sweep_directory(tmp_path: Path) -> None:
    path = tmp_path / "taken"
    path.write_text("not a sweep")
    with pytest.raises(SweepConfigError, match="is a file, not a directory"):
        prepare_sweep_dir(path, tiny())
    with pytest.raises(SweepConfigError, match=r"cannot hold the sweep \(Not a directory\)"):
        prepare_sweep_dir(path / "inside", tiny())


def test_unknown_task_is_refused() -> None:
    with pytest.raises(SweepConfigError, match="no sweep defaults"):
        SweepConfig.for_task("imagenet")


# ---------------------------------------------------------------------------------------------
# Choosing the best learning rate and widening the grid
# ---------------------------------------------------------------------------------------------


def test_best_run_reaches_most_goals_then_fastest() -> None:
    records = {
        RunSpec(8, -1): fake_record(8, -1, [50, None]),
        RunSpec(8, 0): fake_record(8, 0, [30, 90]),
        RunSpec(8, 1): fake_record(8, 1, [20, 120]),  # faster to the easy goal, slower to the hard one
    }
    assert best_lr_index(records, 8) == 0
    assert plan_widening(tiny(batch_sizes=[8, 32, 128]), records) == []


def test_widening_goes_past_the_edge_holding_the_best_run() -> None:
    records = {
        RunSpec(8, -1): fake_record(8, -1, [50, 200]),
        RunSpec(8, 0): fake_record(8, 0, [30, 90]),
        RunSpec(32, -1): fake_record(32, -1, [10, 40]),
        RunSpec(32, 0): fake_record(32, 0, [None, None], stopped="diverged"),
        RunSpec(128, -1): fake_record(128, -1, [9, 30]),
        RunSpec(128, 0): fake_record(128, 0, [9, 30]),  # a tie goes to the rule's value: no widening
    }
    cfg = tiny(batch_sizes=[8, 32, 128], max_widenings=1)
    assert plan_widening(cfg, records) == [RunSpec(8, 1), RunSpec(32, -2)]
    records[RunSpec(8, 1)] = fake_record(8, 1, [20, 60])  # best again on the edge, but no widening left
    records[RunSpec(32, -2)] = fake_record(32, -2, [20, 80])
    assert plan_widening(cfg, records) == []
    assert plan_widening(tiny(batch_sizes=[8, 32, 128], max_widenings=2), records) == [RunSpec(8, 2)]


def test_sweep_widens_the_grid_when_every_learning_rate_is_too_small(tmp_path: Path) -> None:
    # lr_max = 0.01: the rule's learning rates are far too small, so the largest one is best at
    # every batch size and the grid is widened upwards until the widenings run out.
    cfg = tiny(lr_max=0.01, max_widenings=2, lr_step=4.0, max_steps=60)
    result = run_sweep(cfg, tmp_path, n_bootstrap=100)
    for b in cfg.batch_sizes:
        assert sorted(s.lr_index for s in result.records if s.batch_size == b) == [-1, 0, 1, 2]
    assert result.trained == len(result.records) == 12


def test_results_table_takes_the_fastest_run_and_censors_unreached_goals() -> None:
    cfg = tiny(batch_sizes=[8, 32, 128])
    records = {
        RunSpec(8, -1): fake_record(8, -1, [50, None]),
        RunSpec(8, 0): fake_record(8, 0, [30, None]),
        RunSpec(32, 0): fake_record(32, 0, [10, 40]),
        RunSpec(128, 0): fake_record(128, 0, [None, None], stopped="diverged"),
        RunSpec(128, -1): fake_record(128, -1, [None, None], stopped="budget", steps_run=300),
    }
    table = results_table(cfg, records).set_index(["goal", "batch_size"])
    assert table.loc[(0.6, 8), "steps"] == 30 and table.loc[(0.6, 8), "reached"]
    assert table.loc[(0.35, 8), "steps"] == 100 and not table.loc[(0.35, 8), "reached"]  # censored
    # Only the run that did not diverge says how long the best-tuned run needs at least.
    assert table.loc[(0.6, 128), "steps"] == 300 and not table.loc[(0.6, 128), "reached"]


def test_b_crit_plots_label_the_goal_axis_by_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures: dict[str, Any] = {}
    monkeypatch.setattr(
        plotting_critical, "save_figure", lambda fig, path, **_: figures.update({path.name: fig})
    )
    cfg = SweepConfig.for_task(
        "digits", **{**TINY, "batch_sizes": [8, 32, 128], "loss_goals": [0.6]}, error_goals=[0.2]
    )
    steps = {8: 500, 32: 200, 128: 125}  # S_min (1 + B_crit/B) with S_min = 100, B_crit = 32
    goals = (("train_loss", 0.6), ("test_error", 0.2))
    records = {RunSpec(b, 0): fake_record(b, 0, [s, s], goals=goals) for b, s in steps.items()}
    write_results(cfg, tmp_path, records, n_bootstrap=100)
    assert figures["b_crit.png"].axes[0].get_xlabel() == "goal (training loss)"
    assert figures["b_crit_test_error.png"].axes[0].get_xlabel() == "goal (test error, fraction)"


# ---------------------------------------------------------------------------------------------
# Sweeps on disk: records, results, resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """An uninterrupted tiny sweep (one process)."""
    out = tmp_path_factory.mktemp("reference")
    return out, run_sweep(tiny(), out, n_bootstrap=100)


def test_sweep_writes_a_self_describing_directory(reference: tuple[Path, Any]) -> None:
    out, result = reference
    assert (
        SweepConfig.from_dict(
            {
                k: v
                for k, v in json.loads((out / "config.json").read_text()).items()
                if k != "noisescale_version"
            }
        )
        == tiny()
    )
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(f"{s.name(tiny())}.json" for s in result.records)  # no temporary files
    for spec, record in result.records.items():
        assert record.batch_size == spec.batch_size and record.lr == spec.lr(tiny())
        assert record.steps_run <= tiny().budget(spec.batch_size)
        for goal in record.goals:
            if goal.reached:
                assert goal.examples == goal.steps * spec.batch_size
                assert 1 <= goal.steps <= record.steps_run
                assert goal.steps_low < goal.steps <= goal.steps_high  # the checks around it
        assert record.curve[0].step == 0 and record.curve[-1].step == record.steps_run
    table = load_sweep(out / "results.csv")  # readable by `noisescale fit`
    assert len(table) == len(tiny().goals) * len(tiny().batch_sizes)
    assert table["reached"].all()
    fit = json.loads((out / "fit.json").read_text())
    assert [g["goal"] for g in fit["goals"]] == [0.6, 0.35]
    assert fit["unit"] == "examples" and fit == result.report.to_json()
    for png in ("pareto.png", "b_crit.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_run_averaged_b_simple_is_recorded_per_goal(reference: tuple[Path, Any]) -> None:
    _, result = reference
    # Near the start of linreg B_simple is about 7 examples (SCIENCE.md oracle) and it grows as
    # the loss approaches its floor; a run average to a goal lies in that range.
    values = [g.b_simple for r in result.records.values() for g in r.goals if g.b_simple is not None]
    assert values and all(1.0 < v < 200.0 for v in values)


class Interrupt(Exception):
    """Stands for a kill after some runs finished."""


def test_resume_after_an_interruption_loses_nothing(reference: tuple[Path, Any], tmp_path: Path) -> None:
    ref_out, ref = reference
    out = tmp_path / "interrupted"
    finished: list[RunSpec] = []

    def stop_after_five(spec: RunSpec, record: RunRecord) -> None:
        finished.append(spec)
        if len(finished) == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_sweep(tiny(), out, on_record=stop_after_five)
    before = run_files(out)
    assert len(before) == 5
    trained: list[RunSpec] = []
    result = run_sweep(tiny(), out, on_record=lambda s, r: trained.append(s), n_bootstrap=100)
    after = run_files(out)
    assert {k: after[k] for k in before} == before  # finished runs are never redone
    assert set(trained).isdisjoint(finished) and len(trained) == len(ref.records) - 5
    assert result.trained == len(trained)
    assert without_wall_time(result.records) == without_wall_time(ref.records)
    assert (out / "results.csv").read_text() == (ref_out / "results.csv").read_text()
    again = run_sweep(tiny(), out, n_bootstrap=100)  # nothing left to do
    assert again.trained == 0 and run_files(out) == after


def test_a_record_torn_by_a_kill_is_not_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The process dies while writing the 3rd record: no partial record may be left behind,
    # and the resumed sweep redoes exactly that run.
    real_replace, calls = os.replace, []

    def dying_replace(src: Any, dst: Any) -> None:
        if "runs" in str(dst):
            calls.append(dst)
            if len(calls) == 3:
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(nsio.os, "replace", dying_replace)
    out = tmp_path / "torn"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny(), out)
    monkeypatch.setattr(nsio.os, "replace", real_replace)
    assert sorted(run_files(out)) == sorted(Path(p).name for p in calls[:2])  # no temporary file either
    trained: list[RunSpec] = []
    run_sweep(tiny(), out, on_record=lambda s, r: trained.append(s), n_bootstrap=100)
    assert Path(calls[2]).name in {f"{s.name(tiny())}.json" for s in trained}


def test_a_directory_of_another_sweep_is_refused(reference: tuple[Path, Any]) -> None:
    out, _ = reference
    with pytest.raises(SweepConfigError, match=r"holds another sweep \(max_steps: saved 300, asked 301"):
        run_sweep(tiny(max_steps=301), out)
    assert load_records(out, tiny()).keys() == reference[1].records.keys()  # untouched


def test_an_unreadable_record_is_redone(reference: tuple[Path, Any], tmp_path: Path) -> None:
    out = tmp_path / "copy"
    (out / "runs").mkdir(parents=True)
    (out / "config.json").write_bytes((reference[0] / "config.json").read_bytes())
    for p in (reference[0] / "runs").iterdir():
        (out / "runs" / p.name).write_bytes(p.read_bytes())
    victim = sorted((out / "runs").iterdir())[0]
    victim.write_text('{"batch_size": 2, "lr_')  # cannot happen with atomic writes; still handled
    result = run_sweep(tiny(), out, n_bootstrap=100)
    assert result.trained == 1
    assert json.loads(victim.read_text())["name"] == victim.stem


# ---------------------------------------------------------------------------------------------
# Processes: parallel jobs, and a real SIGKILL
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_jobs_give_the_same_records_as_one(reference: tuple[Path, Any], tmp_path: Path) -> None:
    ref_out, ref = reference
    result = run_sweep(tiny(), tmp_path / "jobs2", jobs=2, n_bootstrap=100)
    assert without_wall_time(result.records) == without_wall_time(ref.records)
    assert (tmp_path / "jobs2" / "results.csv").read_text() == (ref_out / "results.csv").read_text()


# Runs of about a second each: the goal 0.2 lies below linreg's loss floor (0.245), so every run
# trains its whole budget, and the kill lands while runs are in flight.
SLOW = {"batch_sizes": [4, 16, 64], "loss_goals": [0.5, 0.2], "lr_points": 1, "max_steps": 600}


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_resumes_to_the_same_result(tmp_path: Path) -> None:
    out, fresh = tmp_path / "killed", tmp_path / "fresh"
    options = [
        "--batch-size",
        "4",
        "--batch-size",
        "16",
        "--batch-size",
        "64",
        "--loss-goal",
        "0.5",
        "--loss-goal",
        "0.2",
        "--lr-points",
        "1",
        "--max-steps",
        "600",
    ]  # the same as SLOW; fmt: skip
    cmd = [sys.executable, "-m", "noisescale", "sweep", "--task", "linreg", *options, "--out", str(out),
           "--jobs", "2", "--no-progress", "--bootstrap", "100"]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "runs").glob("*.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker processes
        proc.wait()
    survivors = run_files(out)
    assert 1 <= len(survivors) < 3, "the kill should land halfway through the sweep"
    for name in survivors:
        json.loads((out / "runs" / name).read_text())  # whole records only
    config = SweepConfig.for_task("linreg", **SLOW)
    resumed = run_sweep(config, out, n_bootstrap=100)  # refused if the CLI saved another config
    assert resumed.trained == 3 - len(survivors)
    after = run_files(out)
    assert {k: after[k] for k in survivors} == survivors
    run_sweep(config, fresh, n_bootstrap=100)
    assert (out / "results.csv").read_text() == (fresh / "results.csv").read_text()
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == [
        "metric", "goal", "batch_size", "steps", "steps_low", "steps_high", "reached", "run", "lr",
        "b_simple", "b_simple_preconditioned", "unit",
    ]  # fmt: skip
    assert table["b_simple_preconditioned"].isna().all()  # plain SGD: no preconditioner
    assert (table["unit"] == "examples").all()
    assert not table.loc[table["goal"] == 0.2, "reached"].any()  # below the floor: censored
