"""examples/tensorboard_loop.py and examples/plain_loop.py, and the extras' import errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from noisescale.integrations import require
from tests.integrations.examples import B_SIMPLE, RAW_FLOAT, load, run


def test_tensorboard_loop_writes_the_estimate(tmp_path: Path) -> None:
    meter = load("tensorboard_loop").main(tmp_path, steps=20)  # writes at steps 10 and 20
    est = meter.compute()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"noise_scale/trace_sigma", "noise_scale/grad_norm_sq", "noise_scale/resolved"} <= tags
    assert {"noise_scale/module/0/trace_sigma", "noise_scale/param_group/param_group_0/trace_sigma"} <= tags
    written = events.Scalars("noise_scale/trace_sigma")
    assert [e.step for e in written] == [10, 20]
    assert written[-1].value == pytest.approx(est.trace_sigma, rel=1e-6)  # stored as float32


def test_plain_loop_resolves_and_prints_rounded_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    est = run("plain_loop")["est"]
    assert est.resolved and est.steps == 100
    assert set(est.groups) == {"0", "2"}
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert re.fullmatch(rf"{B_SIMPLE} after 100 steps", lines[0])
    assert [line.split(":")[0] for line in lines[1:]] == ["  module 0", "  module 2"]
    assert all(re.fullmatch(rf"  module \d: {B_SIMPLE}", line) for line in lines[1:])
    assert not RAW_FLOAT.search(out)  # the per-module values once printed as 307.32104327359593


def test_tensorboard_loop_prints_its_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["tensorboard_loop.py", str(tmp_path)])
    assert run("tensorboard_loop")["est"].resolved
    out = capsys.readouterr().out
    assert re.fullmatch(rf"{B_SIMPLE} after 40 steps; events in {re.escape(str(tmp_path))}\n", out)


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'noisescale\[lightning\]'"):
        require("lightning.pytorch", "lightning")
