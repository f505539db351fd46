"""The schedule export: the controller's rule replayed on a curve, in Megatron-LM and OLMo-core formats."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from noisescale.control.export import Stage, read_run, schedule_from_run, to_csv, to_megatron, to_olmo
from noisescale.control.policy import BatchSizePolicy


def write_run(folder: Path, curve: list[tuple[int, tuple[float, float] | None]], **summary: Any) -> Path:
    """A run directory as `noisescale measure` writes it (only the fields the export reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    fields = {"unit": "images", "batch_size": 64, "microbatches": 2, "world_size": 1, **summary}
    (folder / "summary.json").write_text(json.dumps(fields))
    lines = [
        json.dumps(
            {
                "step": i + 1,
                "examples": e,
                "b_simple_ci": None if ci is None else list(ci),
                "resolved": ci is not None,
            }
        )
        for i, (e, ci) in enumerate(curve)
    ]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_read_run_takes_the_unit_batch_micro_batch_and_curve(tmp_path: Path) -> None:
    run = read_run(
        write_run(tmp_path, [(64, None), (128, (10.0, 30.0))], world_size=2, microbatches=4, batch_size=256)
    )
    assert (run.unit, run.batch_size, run.micro_batch_size, run.world_size) == ("images", 256, 32, 2)
    assert run.examples == [64, 128] and run.cis == [None, (10.0, 30.0)]
    assert run.units_per_example is None


def test_read_run_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="written by `noisescale measure`"):
        read_run(tmp_path / "nowhere")
    write_run(tmp_path / "a", [(64, None)])
    (tmp_path / "a" / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks 'batch_size'"):
        read_run(tmp_path / "a")
    write_run(tmp_path / "b", [])
    (tmp_path / "b" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no step"):
        read_run(tmp_path / "b")
    for text, match in (
        ("{torn", "summary.json is not valid JSON"),
        ("[64]", "summary.json holds no JSON object"),
    ):
        (tmp_path / "a" / "summary.json").write_text(text)  # a bare JSONDecodeError/TypeError before
        with pytest.raises(ValueError, match=match):
            read_run(tmp_path / "a")


def test_an_unresolved_curve_gives_the_initial_batch_alone() -> None:
    policy = BatchSizePolicy(batch_size=64, micro_batch_size=32)
    assert schedule_from_run(policy, [64 * i for i in range(1, 100)], [None] * 99) == [Stage(0, 64)]


def test_the_replay_spaces_changes_and_keeps_integer_factors() -> None:
    policy = BatchSizePolicy(
        batch_size=32, micro_batch_size=16, world_size=2, max_batch_size=1024, min_examples_between=500
    )
    examples = list(range(100, 5000, 100))
    cis = [(e / 4, e / 2) for e in examples]  # B_simple rising with examples
    stages = schedule_from_run(policy, examples, cis)
    assert stages[0] == Stage(0, 32) and len(stages) >= 3
    for before, after in itertools.pairwise(stages):
        assert after.batch_size % before.batch_size == 0 and after.batch_size % 32 == 0
        assert after.start - before.start >= 500
        assert after.batch_size <= after.start / 4 / 1.1  # the lower bound then


def test_csv_lists_stages_with_micro_batches_per_rank() -> None:
    policy = BatchSizePolicy(batch_size=64, micro_batch_size=16, world_size=2)
    text = to_csv([Stage(0, 64), Stage(3200, 256)], policy, "images")
    assert text == "start,batch_size,micro_batches,unit\n0,64,2,images\n3200,256,8,images\n"


def test_megatron_counts_sequences_and_token_thresholds() -> None:
    stages = [
        Stage(0, 4096),
        Stage(1_000_000, 8192),
        Stage(2_500_000_000, 32768),
        Stage(3_001_234_567, 65536),
    ]
    assert (
        to_megatron(stages, "tokens", 512) == '--step-batch-size-schedule "0:8 1M:16 2500M:64 3001234567:128"'
    )
    with pytest.raises(ValueError, match="--seq-length"):
        to_megatron(stages, "tokens", None)
    with pytest.raises(ValueError, match="not whole sequences of 3000"):
        to_megatron(stages, "tokens", 3000)
    # Examples as samples: thresholds in samples, or in tokens when Megatron is given --seq-length.
    assert (
        to_megatron([Stage(0, 32), Stage(6400, 64)], "images", None)
        == '--step-batch-size-schedule "0:32 6400:64"'
    )
    assert to_megatron([Stage(0, 32), Stage(6400, 64)], "examples", 1000) == (
        '--step-batch-size-schedule "0:32 6400K:64"'
    )


def _parse_megatron(argument: str, seq_length: int) -> list[tuple[int, int]]:
    """Megatron-LM's parsing (StepBatchsizeNumMicroBatchesCalculator): suffixes, then tokens // seq_length."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
    out = []
    for entry in argument.split('"')[1].split():
        threshold, batch = entry.split(":")
        mult = scale.get(threshold[-1], 1)
        value = int(float(threshold.rstrip("KMBT")) * mult)
        out.append((value // seq_length, int(batch)))
    return out


def test_megatron_reads_back_the_schedule() -> None:
    stages = [Stage(0, 2048), Stage(3_000_000, 4096), Stage(12_288_000, 16384)]
    parsed = _parse_megatron(to_megatron(stages, "tokens", 256), 256)
    assert parsed == [(s.start // 256, s.batch_size // 256) for s in stages]
    assert parsed[0][0] == 0 and all(a[0] < b[0] for a, b in itertools.pairwise(parsed))


def test_olmo_needs_tokens() -> None:
    text = to_olmo([Stage(0, 65536), Stage(5_000_000, 262144)], "tokens")
    assert "batch_sizes=[65536, 262144]" in text
    assert "schedule=[Duration.tokens(0), Duration.tokens(5000000)]" in text
    with pytest.raises(ValueError, match="count tokens, and this run counts images"):
        to_olmo([Stage(0, 64)], "images")
