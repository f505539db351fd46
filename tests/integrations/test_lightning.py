"""examples/lightning_fit.py: the callback measures and logs through Lightning's logger."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.integrations.examples import load


def test_lightning_fit_logs_what_the_meter_computes(tmp_path: Path) -> None:
    trainer, callback = load("lightning_fit").main(tmp_path, steps=10)  # logs at steps 5 and 10
    meter = callback.meter
    assert meter.method == "microbatch"  # accumulate_grad_batches=2, one process
    est = meter.compute()
    assert est.steps == 10
    assert est.examples == 10 * 64
    logged = trainer.logged_metrics
    # Lightning stores logged floats as float32 tensors: compare at float32 precision.
    if est.b_simple is not None:
        assert float(logged["noise_scale/b_simple"]) == pytest.approx(est.b_simple, rel=1e-6)
    assert float(logged["noise_scale/grad_norm_sq"]) == pytest.approx(est.grad_norm_sq, rel=1e-6)
    assert float(logged["noise_scale/trace_sigma"]) == pytest.approx(est.trace_sigma, rel=1e-6)
    for name in ("net.0", "net.2"):
        assert f"noise_scale/module/{name}/trace_sigma" in logged
    assert "noise_scale/param_group/param_group_0/grad_norm_sq" in logged
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r.get("noise_scale/trace_sigma")] == ["4", "9"]
