"""Sweeps of an RL task: return goals (reached from below), seeds in lockstep, the results table and fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from noisescale.critical.goals import crossing, meets
from noisescale.critical.sweepdata import load_sweep
from noisescale.errors import SweepConfigError
from noisescale.experiments.sweep import (
    CurvePoint,
    RunSpec,
    SweepConfig,
    load_records,
    prepare_sweep_dir,
    run_sweep,
)
from noisescale.io import write_json

# Three batch sizes (2, 4 and 8 copies of 16 steps), one learning rate, two seeds, easy goals.
TINY = {
    "batch_sizes": [32, 64, 128],
    "return_goals": [30.0, 60.0],
    "seeds": 2,
    "lr_points": 1,
    "max_widenings": 0,
    "max_steps": 400,
    "max_examples": 20_000,
    "min_steps": 40,
}


def tiny(**overrides: Any) -> SweepConfig:
    return SweepConfig.for_task("cartpole", **{**TINY, **overrides})


def test_a_return_goal_is_reached_from_below() -> None:
    assert meets("mean_return", 200.0, 195.0) and not meets("mean_return", 190.0, 195.0)
    assert meets("train_loss", 0.1, 0.2) and not meets("train_loss", 0.3, 0.2)
    c = crossing([0, 10, 20, 40], [None, 20.0, 80.0, 300.0], 195.0, above=True)
    assert c.reached and (c.low, c.high) == (20.0, 40.0) and 20 < c.steps < 40
    assert not crossing([0, 10], [None, 20.0], 195.0, above=True).reached
    assert crossing([0, 10, 20], [None, 20.0, 80.0], 50.0).steps == 10.0  # a loss: already below at 10


def test_cartpole_defaults_and_goal_order() -> None:
    cfg = SweepConfig.for_task("cartpole")
    assert cfg.goals[0].metric == "mean_return" and [g.level for g in cfg.goals] == [195.0, 475.0]
    assert cfg.seeds == 3 and cfg.optimizer == "adamw" and cfg.units_per_example == 16
    assert SweepConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("task", "overrides", "message"),
    [
        pytest.param("cartpole", {"return_goals": []}, "needs return goals", id="no_return_goal"),
        pytest.param("cartpole", {"loss_goals": [0.5]}, "needs return goals and no other", id="loss_goal"),
        pytest.param("cartpole", {"return_goals": [-5.0]}, "positive and finite", id="negative"),
        pytest.param("cartpole", {"seeds": 0}, "seeds=0", id="no_seed"),
        pytest.param("cartpole", {"batch_sizes": [32, 40, 64]}, "multiple of 16", id="part_rollout"),
        pytest.param("linreg", {"return_goals": [100.0]}, "not an RL task", id="return_goal_linreg"),
        pytest.param("linreg", {"seeds": 2}, "more for an RL task", id="seeds_linreg"),
    ],
)
def test_invalid_rl_configs_say_what_to_change(task: str, overrides: dict, message: str) -> None:
    with pytest.raises(SweepConfigError, match=message):
        SweepConfig.for_task(task, **overrides)


def test_curve_points_keep_returns_and_groups_and_read_old_records() -> None:
    groups = {"policy": None, "value": 2.0}
    point = CurvePoint(7, None, None, True, 3.0, 1.0, 3.0, mean_return=120.5, groups=groups)
    assert CurvePoint.from_json(json.loads(json.dumps(point.to_json()))) == point
    old = {"step": 3, "train_loss": 0.5, "test_error": None}  # a record of an image sweep
    assert CurvePoint.from_json(old) == CurvePoint(3, 0.5, None)
    assert CurvePoint(3, 0.5, None).to_json() == old


def test_a_sweep_of_older_settings_resumes(tmp_path: Path) -> None:
    # config.json written before return goals and seeds existed: their defaults were in force.
    cfg = SweepConfig.for_task("linreg")
    saved = cfg.to_dict()
    for key in ("return_goals", "seeds", "optimizer", "warmup_steps", "weight_decay", "units_per_example"):
        saved.pop(key)
    write_json(tmp_path / "config.json", saved)
    assert prepare_sweep_dir(tmp_path, cfg) is True
    with pytest.raises(SweepConfigError, match="optimizer: saved 'sgd', asked 'adamw'"):
        prepare_sweep_dir(tmp_path, SweepConfig.for_task("linreg", optimizer="adamw"))


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("cartpole")
    return out, run_sweep(tiny(), out, n_bootstrap=100)


def test_a_tiny_cartpole_sweep_end_to_end(swept: tuple[Path, Any]) -> None:
    out, result = swept
    assert len(result.records) == 3
    for spec, record in result.records.items():
        assert record.unit == "observations" and record.stopped in ("goals", "budget")
        assert record.curve[0].mean_return is None  # no episode has ended before the first update
        returns = [p.mean_return for p in record.curve if p.mean_return is not None]
        assert returns == sorted(returns)  # the median of best-so-far returns never falls
        for goal in record.goals:
            if goal.reached:
                assert goal.examples == goal.steps * spec.batch_size
                hit = [p for p in record.curve if p.mean_return is not None and p.mean_return >= goal.goal]
                assert goal.steps_high == hit[0].step
        assert record.curve[-1].measured and set(record.curve[-1].groups or {}) == {"policy", "value"}
    table = load_sweep(out / "results.csv")
    assert set(table["metric"]) == {"mean_return"} and set(table["unit"]) == {"observations"}
    assert table["reached"].any()
    fit = json.loads((out / "fit.json").read_text())
    assert fit["unit"] == "observations" and [g["goal"] for g in fit["goals"]] == [30.0, 60.0]
    assert fit["power_law"] is None  # a return is not a loss: no B_crit(L) law
    assert (out / "pareto_mean_return.png").read_bytes()[:4] == b"\x89PNG"


def test_a_cartpole_sweep_resumes_without_training(swept: tuple[Path, Any]) -> None:
    out, result = swept
    again = run_sweep(tiny(), out, n_bootstrap=100)
    assert again.trained == 0 and again.table.equals(result.table)
    assert set(load_records(out, tiny())) == {RunSpec(b, 0) for b in (32, 64, 128)}
