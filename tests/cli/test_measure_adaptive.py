"""``noisescale measure --adaptive``: the batch grows by integer factors and the schedule is recorded."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from noisescale.cli.app import app
from noisescale.control.export import read_run, schedule_from_run
from noisescale.control.policy import BatchSizePolicy


def _measure(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["measure", "--threads", "1", "--no-progress", *args])
    return result.exit_code, result.stdout, result.stderr


def test_an_adaptive_linreg_run_records_its_schedule(tmp_path: Path) -> None:
    out = tmp_path / "linreg"
    # The oracle holds its weights at B_simple = 7.41 examples; at r = 1000 examples per step the target is
    # sqrt(1000 x 7.4) = 86: the batch of 16 grows by the largest integer factor, 4, as soon as resolved.
    args = ["--task", "linreg", "--adaptive", "--exchange-rate", "1000", "--steps", "200", "--out", str(out)]
    code, stdout, stderr = _measure(*args)
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    schedule = summary["batch_schedule"]
    assert schedule[0] == {"step": 0, "examples": 0, "batch_size": 16, "lr": 0.0}
    assert [c["batch_size"] for c in schedule] == [16, 64]
    assert summary["adaptive"]["exchange_rate"] == 1000.0 and summary["micro_batch_size"] == 16
    change = schedule[1]
    assert [r["batch_size"] for r in records] == [16] * change["step"] + [64] * (200 - change["step"])
    assert records[change["step"] - 1]["examples"] == change["examples"]
    assert summary["examples"] == 16 * change["step"] + 64 * (200 - change["step"])
    assert (out / "batch_size.png").read_bytes()[:4] == b"\x89PNG"
    assert "16 -> 64 examples (1 change(s), adaptive)" in stdout
    # One rule: the export replays the run and finds the controller's own decisions.
    run = read_run(out)
    policy = BatchSizePolicy(batch_size=16, micro_batch_size=16, exchange_rate=1000.0)
    stages = schedule_from_run(policy, run.examples, run.cis)
    assert [(s.start, s.batch_size) for s in stages] == [(c["examples"], c["batch_size"]) for c in schedule]


def test_adaptive_options_are_checked_before_training(tmp_path: Path) -> None:
    for args, message in [
        (["--max-batch-size", "64"], "need --adaptive"),
        (
            [
                "--adaptive",
                "--batch-size",
                "32",
                "--microbatches",
                "2",
                "--method",
                "microbatch",
                "--max-batch-size",
                "16",
            ],
            "below `min_batch_size`",
        ),
        (["--adaptive", "--max-batch-size", "40"], "not a multiple"),
        (["--adaptive", "--critical-factor", "1", "--exchange-rate", "2"], "one target"),
    ]:
        code, _, stderr = _measure("--task", "linreg", "--out", str(tmp_path / "x"), *args)
        assert code == 2 and message in stderr, (args, stderr)
