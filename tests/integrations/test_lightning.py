"""examples/lightning_fit.py: the callback measures and logs through Lightning's logger."""

from __future__ import annotations

import csv
import re
import tempfile
from pathlib import Path

import pytest

from tests.integrations.examples import B_SIMPLE, RAW_FLOAT, run


def test_lightning_fit_logs_what_the_meter_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "mkdtemp", lambda: str(tmp_path))  # the CSV logger's directory
    script = run("lightning_fit")  # 30 steps, logs every 5
    trainer, callback = script["trainer"], script["callback"]
    meter = callback.meter
    assert meter.method == "microbatch"  # accumulate_grad_batches=2, one process
    est = meter.compute()
    assert est.steps == 30
    assert est.examples == 30 * 64
    assert est.resolved and est.contradiction is None
    assert est.b_simple is not None and est.b_simple_ci is not None
    assert 0 < est.b_simple_ci[0] < est.b_simple < est.b_simple_ci[1]  # a bounded, positive interval
    logged = trainer.logged_metrics
    # Lightning stores logged floats as float32 tensors: compare at float32 precision.
    assert float(logged["noise_scale/resolved"]) == 1.0
    assert float(logged["noise_scale/b_simple"]) == pytest.approx(est.b_simple, rel=1e-6)
    assert float(logged["noise_scale/b_simple_low"]) == pytest.approx(est.b_simple_ci[0], rel=1e-6)
    assert float(logged["noise_scale/b_simple_high"]) == pytest.approx(est.b_simple_ci[1], rel=1e-6)
    assert float(logged["noise_scale/grad_norm_sq"]) == pytest.approx(est.grad_norm_sq, rel=1e-6)
    assert float(logged["noise_scale/trace_sigma"]) == pytest.approx(est.trace_sigma, rel=1e-6)
    for name in ("net.0", "net.2"):
        assert f"noise_scale/module/{name}/trace_sigma" in logged
    assert "noise_scale/param_group/param_group_0/grad_norm_sq" in logged
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r.get("noise_scale/trace_sigma")] == ["4", "9", "14", "19", "24", "29"]
    out = capsys.readouterr().out
    assert re.search(rf"^{B_SIMPLE} after 30 steps \(1,920 examples\)", out, re.MULTILINE)
    assert not RAW_FLOAT.search(out)
