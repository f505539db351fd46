"""A measured run as a batch-size warmup schedule, for trainers that cannot run the controller inside.

:func:`schedule_from_run` replays a run's B_simple-versus-examples curve (``metrics.jsonl`` of
``noisescale measure``, adaptive or not) through the controller's own decision rule
(:func:`noisescale.control.policy.decide`, one look per logged step), so the schedule has the
controller's integer factors, multiples of the micro-batch, interval, hysteresis and spacing.
It assumes B_simple follows examples seen, whatever the batch: the paper's regime below the
critical batch, where progress per example barely depends on the batch (McCandlish et al. 2018,
eq. 2.11); a schedule far above B_simple, or another learning rate, moves the curve.

Formats:

- :func:`to_csv`: ``start,batch_size,micro_batches,unit`` rows.
- :func:`to_megatron`: Megatron-LM's ``--step-batch-size-schedule "THRESHOLD:BS ..."`` (NVIDIA/Megatron-LM
  PR #4411, which replaced ``--rampup-batch-size``; ``StepBatchsizeNumMicroBatchesCalculator``): batch
  sizes in samples (sequences), thresholds in tokens when Megatron is given ``--seq-length`` (else
  in samples), the first at 0, K/M/B/T suffixes (1e3 to 1e12).
- :func:`to_olmo`: OLMo-core's ``BatchSizeSchedulerCallback(batch_sizes=[...],
  schedule=[Duration.tokens(...), ...])`` (``olmo_core.train.callbacks.batch_size_scheduler``), whose
  global batch sizes count tokens and must change by integer factors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from noisescale.control.policy import BatchSizePolicy, ControllerState, decide
from noisescale.io import read_jsonl

__all__ = ["MeasuredRun", "Stage", "read_run", "schedule_from_run", "to_csv", "to_megatron", "to_olmo"]


class Stage(NamedTuple):
    """From ``start`` examples seen on, a global batch of ``batch_size`` examples."""

    start: int
    batch_size: int


class MeasuredRun(NamedTuple):
    """What a run directory tells a schedule.

    Attributes:
        unit: what batch sizes and examples count (``images``, ``tokens``...).
        batch_size: the run's (initial) global batch, in ``unit``.
        micro_batch_size: units per backward pass on one rank.
        world_size: data-parallel ranks.
        units_per_example: units one example carries (the sequence length of a token run), or None.
        examples: ``[N]`` examples seen at each logged step.
        cis: ``[N]`` B_simple's interval then, None where not resolved.
    """

    unit: str
    batch_size: int
    micro_batch_size: int
    world_size: int
    units_per_example: int | None
    examples: list[int]
    cis: list[tuple[float, float] | None]


def _ci(record: dict[str, Any]) -> tuple[float, float] | None:
    ci = record.get("b_simple_ci")
    return None if not record.get("resolved") or ci is None else (float(ci[0]), float(ci[1]))


def read_run(run_dir: str | Path) -> MeasuredRun:
    """Read ``summary.json`` (unit, batch, micro-batches, ranks) and ``metrics.jsonl`` (the curve).

    Raises:
        FileNotFoundError: if either file is missing (naming the command that writes them).
        ValueError: if summary.json is not a JSON object, they lack a field, or the curve has no
            logged step.
    """
    run = Path(run_dir)
    for name in ("summary.json", "metrics.jsonl"):
        if not (run / name).is_file():
            raise FileNotFoundError(
                f"{run / name} not found: give a directory written by `noisescale measure`"
            )
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{run / 'summary.json'} is not valid JSON ({exc}): rerun `noisescale measure`"
        ) from None
    if not isinstance(summary, dict):
        raise ValueError(f"{run / 'summary.json'} holds no JSON object: rerun `noisescale measure`")
    records = read_jsonl(run / "metrics.jsonl")
    try:
        batch, world = int(summary["batch_size"]), int(summary.get("world_size", 1))
        micro = int(summary.get("micro_batch_size") or batch // int(summary["microbatches"]) // world)
        unit = str(summary["unit"])
        examples = [int(r["examples"]) for r in records]
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"{run}: summary.json or metrics.jsonl lacks {exc}: rerun `noisescale measure`"
        ) from None
    if not records:
        raise ValueError(f"{run / 'metrics.jsonl'} holds no step")
    per = summary.get("units_per_example")
    return MeasuredRun(
        unit, batch, micro, world, None if per is None else int(per), examples, [_ci(r) for r in records]
    )


def schedule_from_run(
    policy: BatchSizePolicy, examples: Sequence[int], cis: Sequence[tuple[float, float] | None]
) -> list[Stage]:
    """The controller's decisions along a measured curve, one look per logged step.

    Args:
        policy: the controller's settings (initial batch, micro-batch, ranks, target, limits).
        examples: ``[N]`` examples seen at each logged step, increasing.
        cis: ``[N]`` B_simple's interval at each, or None (not resolved: no change).

    Returns:
        The stages, starting with ``Stage(0, policy.batch_size)``.

    Example:
        >>> policy = BatchSizePolicy(batch_size=32, micro_batch_size=32, max_batch_size=256, hysteresis=0.0)
        >>> schedule_from_run(policy, [320, 640, 960], [None, (70.0, 90.0), (300.0, 400.0)])
        [Stage(start=0, batch_size=32), Stage(start=640, batch_size=64), Stage(start=960, batch_size=256)]
    """
    state = ControllerState.initial(policy)
    stages = [Stage(0, policy.batch_size)]
    for step, (seen, ci) in enumerate(zip(examples, cis, strict=True), start=1):
        state = decide(policy, state._replace(steps=step, examples=seen), ci)
        if state.batch_size != stages[-1].batch_size:
            stages.append(Stage(seen, state.batch_size))
    return stages


def to_csv(stages: Sequence[Stage], policy: BatchSizePolicy, unit: str) -> str:
    """``start,batch_size,micro_batches,unit`` rows (micro-batches per rank at each stage).

    Example:
        >>> policy = BatchSizePolicy(batch_size=64, micro_batch_size=32)
        >>> print(to_csv([Stage(0, 64), Stage(6400, 128)], policy, "images"), end="")
        start,batch_size,micro_batches,unit
        0,64,2,images
        6400,128,4,images
    """
    rows = ["start,batch_size,micro_batches,unit"]
    rows += [f"{s.start},{s.batch_size},{s.batch_size // policy.granule},{unit}" for s in stages]
    return "\n".join(rows) + "\n"


def _megatron_number(n: int) -> str:
    """An exact integer, with Megatron's K/M/B/T suffix where it divides: ``250000000000`` -> ``250B``."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def to_megatron(stages: Sequence[Stage], unit: str, seq_length: int | None) -> str:
    """Megatron-LM's ``--step-batch-size-schedule`` argument.

    A token run (``unit == "tokens"``) needs ``seq_length``: batch sizes become sequences
    (tokens / seq_length) and thresholds stay tokens (Megatron reads them as tokens when given
    ``--seq-length``). Another unit counts one sample per example: thresholds are samples, or,
    with ``seq_length``, tokens (samples x seq_length).

    Raises:
        ValueError: for a token run without ``seq_length``, or a batch that is not whole sequences.

    Example:
        >>> to_megatron([Stage(0, 65536), Stage(250_000_000_000, 131072)], "tokens", 2048)
        '--step-batch-size-schedule "0:32 250B:64"'
    """
    if unit == "tokens" and seq_length is None:
        raise ValueError("Megatron counts a batch in sequences: give the sequence length (--seq-length)")
    parts = []
    for stage in stages:
        if unit == "tokens":
            assert seq_length is not None
            if stage.batch_size % seq_length:
                raise ValueError(
                    f"a batch of {stage.batch_size} tokens is not whole sequences of {seq_length}: make the "
                    "micro-batch size a multiple of the sequence length"
                )
            batch, threshold = stage.batch_size // seq_length, stage.start
        else:
            batch, threshold = stage.batch_size, stage.start * (seq_length or 1)
        parts.append(f"{_megatron_number(threshold)}:{batch}")
    return f'--step-batch-size-schedule "{" ".join(parts)}"'


def to_olmo(stages: Sequence[Stage], unit: str) -> str:
    """OLMo-core's ``BatchSizeSchedulerCallback`` settings, as Python.

    Set the data loader's ``global_batch_size`` (tokens) to the first batch size.

    Raises:
        ValueError: unless the run counts tokens (OLMo-core's batch sizes and durations do).

    Example:
        >>> print(to_olmo([Stage(0, 65536), Stage(10**9, 131072)], "tokens"))
        from olmo_core.train.callbacks.batch_size_scheduler import BatchSizeSchedulerCallback
        from olmo_core.train.common import Duration
        <BLANKLINE>
        BatchSizeSchedulerCallback(
            batch_sizes=[65536, 131072],
            schedule=[Duration.tokens(0), Duration.tokens(1000000000)],
        )
    """
    if unit != "tokens":
        raise ValueError(
            f"OLMo-core schedules count tokens, and this run counts {unit}: use --format csv or megatron"
        )
    sizes = ", ".join(str(s.batch_size) for s in stages)
    starts = ", ".join(f"Duration.tokens({s.start})" for s in stages)
    return (
        "from olmo_core.train.callbacks.batch_size_scheduler import BatchSizeSchedulerCallback\n"
        "from olmo_core.train.common import Duration\n\n"
        "BatchSizeSchedulerCallback(\n"
        f"    batch_sizes=[{sizes}],\n"
        f"    schedule=[{starts}],\n"
        ")"
    )
