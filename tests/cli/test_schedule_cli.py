"""``noisescale schedule`` end to end: on a run `noisescale measure` wrote, and on bad input."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from noisescale.cli.app import app
from noisescale.control.export import read_run, schedule_from_run
from noisescale.control.policy import BatchSizePolicy
from tests.control.test_export import write_run


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["schedule", *args])
    return result.exit_code, result.stdout, result.stderr


def test_a_measured_linreg_run_becomes_the_controllers_schedule(tmp_path: Path) -> None:
    out = tmp_path / "linreg"
    measured = CliRunner().invoke(
        app,
        [
            "measure",
            "--task",
            "linreg",
            "--steps",
            "300",
            "--threads",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ],
    )
    assert measured.exit_code == 0, measured.stderr
    # B_simple = 7.41 at the oracle's fixed weights; at r = 1000 examples per step the target is
    # sqrt(1000 x 7.4) = 86 examples: the batch of 16 grows by the largest integer factor 4 <= 86/1.1/16.
    code, stdout, stderr = _run(str(out), "--exchange-rate", "1000")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "start,batch_size,micro_batches,unit"
    assert lines[1] == "0,16,1,examples"
    run = read_run(out)
    policy = BatchSizePolicy(batch_size=16, micro_batch_size=16, exchange_rate=1000.0)
    expected = schedule_from_run(policy, run.examples, run.cis)
    assert lines[1:] == [f"{s.start},{s.batch_size},{s.batch_size // 16},examples" for s in expected]
    assert [s.batch_size for s in expected] == [16, 64]
    assert f"{len(expected)} stage(s) over 4,800 examples" in stderr


def test_megatron_and_olmo_for_a_token_run(tmp_path: Path) -> None:
    curve = [(4096 * i, None if i < 3 else (8e3 * i, 2e4 * i)) for i in range(1, 40)]
    run = write_run(
        tmp_path / "lm", curve, unit="tokens", batch_size=4096, microbatches=2, units_per_example=256
    )
    code, stdout, stderr = _run(str(run), "--format", "megatron", "--max-batch-size", "65536")
    assert code == 0, stderr
    assert stdout.startswith('--step-batch-size-schedule "0:16 12288:')  # 4096 tokens = 16 sequences of 256
    code, stdout, stderr = _run(str(run), "--format", "olmo", "--max-batch-size", "65536")
    assert code == 0, stderr
    assert "BatchSizeSchedulerCallback(" in stdout and "Duration.tokens(0)" in stdout
    code, _, stderr = _run(str(run), "--format", "megatron", "--seq-length", "3000")
    assert code == 2 and "not whole sequences" in stderr


def test_bad_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    run = write_run(tmp_path / "mnist", [(64, None)])
    for args, message in [
        ([str(tmp_path / "missing")], "written by `noisescale measure`"),
        ([str(run), "--max-batch-size", "32"], "below `min_batch_size`"),
        ([str(run), "--micro-batch-size", "48"], "not a multiple"),
        ([str(run), "--format", "olmo"], "count tokens"),
        ([str(run), "--critical-factor", "1", "--exchange-rate", "5"], "one target"),
        ([str(run), "--hysteresis", "nan"], "hysteresis"),
    ]:
        code, stdout, stderr = _run(*args)
        assert code == 2, (args, stdout, stderr)
        assert message in stderr and "Traceback" not in stderr
        assert stderr.strip().count("\n") == 0  # one line
