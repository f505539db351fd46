"""Branched training of the built-in tasks: settings, the directory, resuming exactly, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from noisescale.critical.branched import cumulative_b_crit
from noisescale.errors import BranchConfigError, NoiseScaleError
from noisescale.experiments.branch import BranchConfig, run_branched
from noisescale.experiments.branch import run as branch_run
from noisescale.experiments.tasks import get_task

# digits: base B = 8, branches at 8, 16, 32 images, points at 0, 64 and 128 images with windows of
# 64, 64 and 128 images (window_ratio 1), two checks per window (the least: one step of 32 each), two
# replicas.
TINY = {
    "batch_size": 8,
    "kappas": (1, 2, 4),
    "points": (0, 64, 128),
    "window": 64,
    "window_ratio": 1.0,
    "checks": 2,
    "replicas": 2,
    "eval_examples": 256,
    "max_examples": 256,
    "bootstrap": None,
}


def tiny(**overrides: Any) -> BranchConfig:
    values = {k: v for k, v in {**TINY, **overrides}.items() if k != "bootstrap"}
    return BranchConfig.for_task(get_task("digits"), **values)


def without_times(value: Any) -> Any:
    """The same JSON object without CPU and wall times (the only fields a resume may change)."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if not k.endswith("time_s")}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def read(path: Path) -> Any:
    return without_times(json.loads(path.read_text()))


def branch_files(out: Path) -> dict[str, Any]:
    return {p.name: read(p) for p in sorted((out / "branches").glob("*.json"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("branch") / "ref"
    run_branched(tiny(), out, n_bootstrap=200)
    return out


def test_defaults_of_every_built_in_task_are_valid() -> None:
    for name in ("digits", "linreg", "mnist"):
        config = BranchConfig.for_task(get_task(name))
        assert config.check_examples()[-1] == config.window and config.window % config.unit_examples == 0
        assert len(config.check_examples()) == config.checks + 1  # every branch steps between checks
        assert config.points[0] == 0 and all(
            config.window_at(p) % config.unit_examples == 0 for p in config.points
        )
    mnist = BranchConfig.for_task(get_task("mnist"))
    # SGD with the sweep rule: every branch at the sweep's learning rate for its batch.
    assert mnist.lr == 0.2 and mnist.lr_b_star == 64.0
    assert [mnist.branch_lr(k) for k in (1, 4, 32)] == [0.2, 0.5, 0.888889]
    linear = BranchConfig.for_task(get_task("mnist"), lr_b_star=math.inf)
    assert [linear.branch_lr(k) for k in (1, 4, 32)] == [0.2, 0.8, 6.4]
    adam = BranchConfig.for_task(get_task("mnist"), lr_power=0.5, lr_b_star=math.inf)
    assert adam.branch_lr(4) == 0.4


def test_checks_fall_on_whole_steps_of_every_branch() -> None:
    config = tiny(kappas=(1, 2, 3), window=240, checks=3)  # lcm 6 x 8 = 48 examples per unit
    assert config.check_examples() == (0, 96, 192, 240)
    grown = tiny(window=64, window_ratio=0.5)  # half the examples seen, whole units of 32, at least 64
    assert [grown.window_at(x) for x in (0, 64, 200, 1000)] == [64, 64, 96, 480]
    assert BranchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kappas": (1, 4, 2)}, "must increase and start at 1"),
        ({"kappas": (2, 4)}, "start at 1"),
        ({"kappas": (1,)}, "at least two"),
        ({"window": 0}, "window 0 is not a positive multiple of .* 32"),
        ({"window": 100}, "use 96"),
        ({"window": 32}, "fewer steps than the 2 checks .* use a window of 64 or fewer checks"),
        ({"points": (60,)}, "not 0 or a positive multiple of the base batch 8: use 56 or 64"),
        ({"window_ratio": -1.0}, "window_ratio >= 0"),
        ({"points": (), "loss_points": ()}, "at least one branch point"),
        ({"replicas": 0}, "at least 1"),
        ({"tolerance": -1.0}, "tolerance >= 0"),
        ({"tolerance_kind": "steps"}, "tolerance_kind"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"lr": 0.0}, "lr > 0"),
        ({"max_examples": 64}, "below the last"),
        ({"loss_points": (-1.0,)}, "positive and finite"),
        ({"readings": (math.inf,)}, "positive and finite"),
        ({"method": "ddp"}, "one process"),
        ({"lr_b_star": 0.0}, "lr_b_star > 0"),
    ],
)
def test_bad_settings_say_what_to_change(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(BranchConfigError, match=message):
        tiny(**overrides)
    assert issubclass(BranchConfigError, NoiseScaleError)


def test_report_schema_and_what_was_spent(reference: Path) -> None:
    report = json.loads((reference / "branch.json").read_text())
    assert report["unit"] == "images" and report["task"] == "digits"
    points = report["points"]
    assert [p["examples"] for p in points] == [0, 64, 128] and [p["window"] for p in points] == [64, 64, 128]
    for p in points:
        assert {"examples", "loss", "b_crit", "b_crit_ci", "bound", "b_simple", "kappa_star"} <= set(p)
        assert (p["b_crit"] is None) == (p["bound"] is not None or p["note"] is not None)
        assert [b["batch_size"] for b in p["branches"]] == [8, 16, 32]
        assert p["branches"][0]["examples_ratio"] == 1.0 and p["branches"][0]["keeps_up"]
    assert "initialisation" in points[0]["b_crit_cumulative_note"]
    for i, p in enumerate(points[1:], 1):  # E_min/S_min over the segments before the point
        local = [q["b_crit"] or float(q["bound"].split()[-1]) for q in points[:i]]
        b, e, s = cumulative_b_crit([q["examples"] for q in points[:i]], local, 8, p["examples"])
        bracket, bound = p["b_crit_cumulative_bracket"], p["b_crit_cumulative_bound"]
        assert (bracket is None) == (bound is None)
        value = p["b_crit_cumulative"]
        if bracket is not None:  # the bound is its near end, rounded outward; its far end lies beyond it
            lower = ">" in bound
            value, far = (bracket[0], bracket[1]) if lower else (bracket[1], bracket[0])
            shown = float(bound.split()[-1])
            assert shown <= value if lower else shown >= value
            assert far is None or (far > value if lower else far < value)
        assert (value, p["e_min_cumulative"], p["s_min_cumulative"]) == pytest.approx((b, e, s), rel=1e-12)
        assert (p["b_crit_cumulative"] is None) == any(q["b_crit"] is None for q in points[:i])
        ci = p["b_crit_cumulative_ci"]
        assert ci is None or ci[0] <= ci[1]
    assert report["examples_spent"] == {"base": 128, "branches": 2 * 3 * 256, "total": 128 + 1536}
    assert len(list((reference / "branches").glob("*.json"))) == 18
    assert (reference / "branch.png").read_bytes()[:4] == b"\x89PNG"


def test_a_branch_starts_from_the_checkpoint_with_its_own_data(reference: Path) -> None:
    base = json.loads((reference / "base.json").read_text())
    records = branch_files(reference)
    for p in base["points"]:
        for name, record in records.items():
            if record["point"] == p["index"]:
                assert record["loss"][0] == p["loss"], name  # the same weights, the same subset
    seeds = {(r["point"], r["replica"]): set() for r in records.values()}
    for r in records.values():
        seeds[(r["point"], r["replica"])].add(r["seed"])
    assert all(len(s) == 1 for s in seeds.values())  # one stream per replica, shared by every kappa
    assert len({next(iter(s)) for s in seeds.values()}) == len(seeds)


def test_killed_among_the_branches_resumes_to_the_same_result(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    count = 0

    def kill_after_five(record: object) -> None:
        nonlocal count
        count += 1
        if count == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_branched(tiny(), out, n_bootstrap=200, on_record=kill_after_five)
    assert len(list((out / "branches").glob("*.json"))) == 5 and not (out / "branch.json").exists()
    result = run_branched(tiny(), out, n_bootstrap=200)
    assert result.trained == 13
    assert branch_files(out) == branch_files(reference)
    assert read(out / "branch.json") == read(reference / "branch.json")


def test_killed_in_the_base_run_resumes_to_the_same_result(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "base-killed"
    save = branch_run._save_state

    def save_then_die(path: Path, state: dict) -> None:
        save(path, state)
        raise KeyboardInterrupt  # right after the first checkpoint

    monkeypatch.setattr(branch_run, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_branched(tiny(), out, n_bootstrap=200)
    monkeypatch.setattr(branch_run, "_save_state", save)
    assert [p.name for p in (out / "base").iterdir()] == ["point_0.pt"] and not (out / "base.json").exists()
    run_branched(tiny(), out, n_bootstrap=200)
    assert read(out / "base.json") == read(reference / "base.json")
    assert read(out / "branch.json") == read(reference / "branch.json")


def test_an_unreadable_branch_record_is_redone(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "torn"
    run_branched(tiny(), out, n_bootstrap=200)
    (out / "branches" / "p1_k2_r0.json").write_text('{"point": 1, "kap')
    assert run_branched(tiny(), out, n_bootstrap=200).trained == 1
    assert branch_files(out) == branch_files(reference)


def test_a_directory_of_another_measurement_is_refused(reference: Path) -> None:
    with pytest.raises(BranchConfigError, match=r"holds another branched measurement \(window: saved 64"):
        run_branched(tiny(window=256), reference)


def test_loss_points_branch_where_the_base_first_reaches_them(tmp_path: Path) -> None:
    result = run_branched(
        tiny(points=(), loss_points=(2.1, 0.001), max_examples=512), tmp_path, n_bootstrap=200
    )
    (point,) = result.report["points"]
    assert point["kind"] == "loss" and point["target"] == 2.1 and point["loss"] <= 2.1
    assert result.report["unreached"] == [0.001] and result.report["examples_spent"]["base"] == 512


def test_linreg_records_the_true_noise_scale_at_each_point(tmp_path: Path) -> None:
    config = BranchConfig.for_task(get_task("linreg"), points=(64,), window=256, replicas=1, checks=4)
    report = run_branched(config, tmp_path).report
    (point,) = report["points"]
    assert point["truth"]["b_noise"] > 0 and report["unit"] == "examples"
    assert point["b_crit_ci"] is None  # one replica: no interval


def test_readings_give_b_crit_from_init_where_the_base_reaches_a_loss_without_branches(
    reference: Path, tmp_path: Path
) -> None:
    result = run_branched(tiny(readings=(2.2, 0.001)), tmp_path, n_bootstrap=200)
    report, base = result.report, json.loads((tmp_path / "base.json").read_text())
    (reading,) = report["readings"]
    first = next(c for c in base["curve"] if c["loss"] is not None and c["loss"] <= 2.2)
    assert reading["target"] == 2.2 and (reading["examples"], reading["loss"]) == (
        first["examples"],
        first["loss"],
    )
    assert report["unreached"] == [0.001] and result.trained == 18  # the same branches as without readings
    assert report["points"] == json.loads((reference / "branch.json").read_text())["points"]
    before = [p for p in report["points"] if p["examples"] < reading["examples"]]
    local = [p["b_crit"] or float(p["bound"].split()[-1]) for p in before]
    b, e, s = cumulative_b_crit([p["examples"] for p in before], local, 8, reading["examples"])
    bracket, bound = reading["b_crit_cumulative_bracket"], reading["b_crit_cumulative_bound"]
    value = reading["b_crit_cumulative"] or (bracket[0] if ">" in bound else bracket[1])
    assert (value, reading["e_min_cumulative"], reading["s_min_cumulative"]) == pytest.approx(
        (b, e, s), rel=1e-12
    )
