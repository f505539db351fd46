"""examples/tensorboard_loop.py and examples/plain_loop.py, and the extras' import errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from noisescale.integrations import require
from tests.integrations.examples import load


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


def test_plain_loop_resolves() -> None:
    est = load("plain_loop").main().compute()
    assert est.resolved and est.steps == 100
    assert set(est.groups) == {"0", "2"}


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'noisescale\[lightning\]'"):
        require("lightning.pytorch", "lightning")
