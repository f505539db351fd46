"""``noisescale measure --task cartpole``: observations, the policy and value groups, the returns."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from tests.cli.test_measure_cli import SUMMARY_KEYS, _run


def _summary(out: Path, steps: int) -> dict:
    """The three files exist; every record and the summary hold the supervised keys but the loss."""
    assert (out / "noise_scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS - {"loss"} and "loss" not in summary  # returns instead
    assert summary["mean_return"] == records[-1]["mean_return"]
    return summary


@pytest.mark.parametrize(
    ("method", "extra"),
    [("per-example", []), ("microbatch", ["--microbatches", "4"])],
    ids=["per-example", "microbatch"],
)
def test_measure_cartpole_in_observations(tmp_path: Path, method: str, extra: list[str]) -> None:
    out = tmp_path / "cartpole"
    args = ("--task", "cartpole", "--method", method, "--steps", "30", "--batch-size", "128", "--no-progress")
    code, stdout, stderr = _run(*args, *extra, "--out", str(out))
    assert code == 0, stderr
    summary = _summary(out, steps=30)
    assert summary["unit"] == "observations" and summary["examples"] == 30 * 128
    assert summary["method"] == method.replace("-", "_")
    assert set(summary["groups"]) == {"policy", "value"}
    assert (summary["rollout"], summary["envs"], summary["env"]) == (16, 8, "CartPole-v1")
    assert summary["episodes"] > 0 and 8 <= summary["mean_return"] <= 500
    assert "test_error" not in summary
    for row in ("B_simple, policy", "B_simple, value", "mean return (last 20 episodes)", "128 observations"):
        assert row in stdout


def test_measure_cartpole_resolves_b_simple_with_its_defaults(tmp_path: Path) -> None:
    # The default run (600 updates of 256 observations, 6-7 s of CPU): the value gradient's
    # signal is strong, so the total resolves; the measured values are in the README.
    out = tmp_path / "default"
    code, stdout, stderr = _run("--task", "cartpole", "--no-progress", "--out", str(out))
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resolved"] and summary["b_simple"] > 0 and summary["b_simple_run_mean"] > 0
    assert summary["groups"]["value"]["resolved"]
    means = summary["group_run_means"]
    assert set(means) == {"policy", "value"} and means["value"]["resolved_steps"] > 0
    assert "B_simple, policy, run mean" in stdout
    assert summary["mean_return"] >= 475  # the agent learns CartPole
    assert "observations  [" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--batch-size", "100"), "choose a multiple of 16"),
        (("--method", "microbatch", "--microbatches", "4", "--batch-size", "96"), "choose a multiple of 64"),
        (("--only", "layernorm"), "run it without torchrun, --only"),
        (("--method", "ddp"), "--method ddp needs torchrun"),
    ],
)
def test_bad_cartpole_options_are_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    code, _, stderr = _run("--task", "cartpole", *args, "--steps", "2", "--out", str(tmp_path / "out"))
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and message in stderr


def test_missing_gymnasium_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_gymnasium(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("gymnasium"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gymnasium)
    code, _, stderr = _run("--task", "cartpole", "--steps", "2", "--out", str(tmp_path / "out"))
    assert code == 1
    assert len(stderr.strip().splitlines()) == 1 and "pip install 'noisescale[rl]'" in stderr
