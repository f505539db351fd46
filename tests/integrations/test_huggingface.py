"""examples/hf_trainer.py: the callback measures in tokens and logs through Trainer.log."""

from __future__ import annotations

from pathlib import Path

from tests.integrations.examples import load


def test_trainer_run_logs_what_the_meter_computes(tmp_path: Path) -> None:
    trainer, callback = load("hf_trainer").main(tmp_path, steps=8)  # logs at steps 4 and 8
    meter = callback.meter
    assert meter.method == "microbatch"  # gradient_accumulation_steps=2, one process
    assert callback.unit == "tokens"  # the Trainer divides the loss by the step's label tokens
    assert meter.accumulation == "example_mean"
    est = meter.compute()
    assert est.steps == 8
    logs = [h for h in trainer.state.log_history if "noise_scale/trace_sigma" in h]
    assert [h["step"] for h in logs] == [4, 8]
    last = logs[-1]
    assert last["noise_scale/trace_sigma"] == est.trace_sigma
    assert last["noise_scale/grad_norm_sq"] == est.grad_norm_sq
    assert last.get("noise_scale/b_simple") == est.b_simple
    assert "noise_scale/module/transformer.h.0.attn.c_attn/trace_sigma" in last
    assert {"noise_scale/param_group/param_group_0/trace_sigma", "noise_scale/resolved"} <= set(last)
