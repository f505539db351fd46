"""``noisescale schedule``: a measured run's noise scale as a batch-size warmup schedule.

Usage::

    noisescale schedule runs/mnist                        # CSV: start,batch_size,micro_batches,unit
    noisescale schedule runs/mnist --max-batch-size 4096 --exchange-rate 2000
    noisescale schedule runs/lm --format megatron --micro-batch-size 8192 --seq-length 256
    noisescale schedule runs/lm --format olmo --max-batch-size 1048576

It replays the run's B_simple-versus-examples curve (``metrics.jsonl``, adaptive or not; the unit
from ``summary.json``) through the controller's own decision rule
(:func:`noisescale.control.policy.decide`: integer factors, multiples of micro-batch x ranks, the
interval's lower bound, hysteresis; :mod:`noisescale.control.export`) and prints the schedule:

- ``csv``: ``start,batch_size,micro_batches,unit`` rows;
- ``megatron``: Megatron-LM's ``--step-batch-size-schedule "THRESHOLD:BS ..."`` argument (batch sizes
  in sequences, thresholds in tokens for a token run, which needs ``--seq-length``);
- ``olmo``: OLMo-core's ``BatchSizeSchedulerCallback(batch_sizes=..., schedule=[Duration.tokens(...)])``.

Every batch size on the command line is in the run's unit. Defaults: the run's batch, micro-batch
and world size; no maximum. A notice on stderr says how many stages and when the estimate first
resolved; a run that never resolved gives the initial batch alone. Bad options or files exit with
status 2 and one line.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated

import typer

from noisescale.cli.common import fail
from noisescale.control.export import read_run, schedule_from_run, to_csv, to_megatron, to_olmo
from noisescale.control.policy import BatchSizePolicy

__all__ = ["ScheduleFormat", "schedule"]


class ScheduleFormat(str, enum.Enum):
    """``--format``: what the schedule is written for."""

    csv = "csv"
    megatron = "megatron"
    olmo = "olmo"


def schedule(
    run_dir: Annotated[Path, typer.Argument(help="A directory written by `noisescale measure`.")],
    output_format: Annotated[
        ScheduleFormat, typer.Option("--format", help="Output format.")
    ] = ScheduleFormat.csv,
    batch_size: Annotated[int | None, typer.Option(help="Initial global batch (default: the run's).")] = None,
    micro_batch_size: Annotated[
        int | None, typer.Option(help="Units per backward pass on one rank (default: the run's).")
    ] = None,
    world_size: Annotated[int | None, typer.Option(help="Data-parallel ranks (default: the run's).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Largest global batch (default: none).")] = None,
    critical_factor: Annotated[
        float | None, typer.Option(help="Track B = c B_simple (default c = 1).")
    ] = None,
    exchange_rate: Annotated[
        float | None, typer.Option(help="Track B = sqrt(r B_simple) instead (r: units per step).")
    ] = None,
    hysteresis: Annotated[float, typer.Option(help="Margin the interval's bound must clear.")] = 0.1,
    min_examples_between: Annotated[int, typer.Option(help="Units seen between two changes.")] = 0,
    seq_length: Annotated[
        int | None,
        typer.Option(help="Tokens per sequence, for megatron (default: the run's, if a token run)."),
    ] = None,
) -> None:
    """Turn a run's measured B_simple curve into a batch-size schedule (csv, megatron, olmo).

    Example: noisescale schedule runs/mnist --max-batch-size 4096
    """
    try:
        run = read_run(run_dir)
        policy = BatchSizePolicy(
            batch_size=run.batch_size if batch_size is None else batch_size,
            micro_batch_size=run.micro_batch_size if micro_batch_size is None else micro_batch_size,
            world_size=run.world_size if world_size is None else world_size,
            max_batch_size=max_batch_size,
            critical_factor=critical_factor,
            exchange_rate=exchange_rate,
            hysteresis=hysteresis,
            min_examples_between=min_examples_between,
        )
        stages = schedule_from_run(policy, run.examples, run.cis)
        if output_format is ScheduleFormat.csv:
            text = to_csv(stages, policy, run.unit)
        elif output_format is ScheduleFormat.megatron:
            length = seq_length if seq_length is not None or run.unit != "tokens" else run.units_per_example
            text = to_megatron(stages, run.unit, length) + "\n"
        else:
            text = to_olmo(stages, run.unit) + "\n"
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    sys.stdout.write(text)
    first = next((e for e, ci in zip(run.examples, run.cis, strict=True) if ci is not None), None)
    resolved = "never resolved" if first is None else f"first resolved after {first:,} {run.unit}"
    print(
        f"{len(stages)} stage(s) over {run.examples[-1]:,} {run.unit}; B_simple {resolved}", file=sys.stderr
    )
