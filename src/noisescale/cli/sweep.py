"""``noisescale sweep``: measure the critical batch size of a built-in task with a batch-size sweep.

Usage::

    noisescale sweep --task mnist --out runs/sweep-mnist --jobs 2      # 5-10 min on 2 cores
    noisescale sweep --task fashion-mnist --out runs/sweep-fashion-mnist --jobs 2   # about 9 min
    noisescale sweep --task digits --batch-size 8 --batch-size 32 --batch-size 128 --loss-goal 0.3
    noisescale sweep --task mnist --out /shared/sweep-mnist --executor ray --address HOST:6379
    noisescale sweep --task shakespeare --out runs/sweep-shakespeare --jobs 2   # AdamW, tokens
    noisescale sweep --task cartpole --out runs/sweep-cartpole --jobs 2   # return goals, 3 seeds a run

For a geometric grid of batch sizes it tunes the learning rate of the task's optimizer per
batch size (a grid centred on ``lr_max / (1 + lr_b_star/B)^alpha``: SGD, alpha 1, for the image
tasks; AdamW, alpha 1/2, for ``shakespeare``; widened when the best value is on its edge), trains
every run to the goals (training-loss levels and a test-error level; validation-loss levels for
``shakespeare``, whose batch sizes are in tokens), fits
``S(B) = S_min (1 + B_crit/B)`` per goal (McCandlish et al. 2018, appendix A.2-A.3) and prints
B_crit with its interval next to the run-averaged B_simple measured in the same runs.

Runs go to ``--jobs`` processes, or with ``--executor ray`` to a Ray cluster, one task of one
CPU per run (``pip install 'noisescale[ray]'``; ``OUT`` must then be on storage every node sees
at the same path); each finished run is saved at once in ``OUT/runs/`` and
re-running the same command resumes (finished runs are kept, interrupted ones redone). ``OUT``
also gets ``config.json``, ``results.csv`` (readable by ``noisescale fit``), ``fit.json``,
``pareto.png`` and ``b_crit.png`` (the first loss metric's goals) and ``pareto_<metric>.png`` and
``b_crit_<metric>.png`` (the other metrics' goals). Options left out take the task's defaults
(``config.json`` of a sweep shows them all); a re-run with other settings into the same
``OUT`` is refused.
"""

from __future__ import annotations

import os
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Annotated, NamedTuple

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from noisescale.cli.common import (
    DEFAULT_TASK,
    BootstrapOption,
    ConfidenceOption,
    ExecutorName,
    SweepMethodName,
    TaskName,
    fail,
)
from noisescale.cli.fit import output_console, report_notes, report_table
from noisescale.errors import DatasetNotFoundError, NoiseScaleError
from noisescale.experiments.sweep import RunRecord, RunSpec, SweepConfig, SweepResult, run_sweep
from noisescale.experiments.sweep.run import Executor

__all__ = ["sweep"]

_DEFAULT_METHOD = SweepMethodName.per_example


def _default_jobs() -> int:
    """Every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _microbatches(method: str, given: int | None) -> int | None:
    """Micro-batches per step: as given, else 2 for the microbatch method, else the default (1)."""
    if given is not None:
        return given
    return 2 if method == "microbatch" else None


def _describe(spec: RunSpec, record: RunRecord) -> str:
    reached = sum(g.reached for g in record.goals)
    return (
        f"B={spec.batch_size} {record.unit} lr={record.lr:.4g}: {reached}/{len(record.goals)} goals in "
        f"{record.steps_run} steps ({record.stopped}), {record.wall_time_s:.0f} s"
    )


def sweep(
    task: Annotated[TaskName, typer.Option(help="Built-in task.")] = DEFAULT_TASK,
    out: Annotated[Path | None, typer.Option(help="Sweep directory (default runs/sweep-<task>).")] = None,
    jobs: Annotated[int | None, typer.Option(help="Parallel runs (default: every core).", min=1)] = None,
    batch_size: Annotated[
        list[int] | None,
        typer.Option("--batch-size", help="Batch size of the grid, in the task's unit (repeat)."),
    ] = None,
    loss_goal: Annotated[
        list[float] | None, typer.Option("--loss-goal", help="Training-loss goal (repeat).")
    ] = None,
    validation_loss_goal: Annotated[
        list[float] | None,
        typer.Option("--val-loss-goal", help="Validation-loss goal, nats per unit (repeat)."),
    ] = None,
    error_goal: Annotated[
        list[float] | None, typer.Option("--error-goal", help="Test-error goal, a fraction (repeat).")
    ] = None,
    return_goal: Annotated[
        list[float] | None, typer.Option("--return-goal", help="Mean-return goal of an RL task (repeat).")
    ] = None,
    no_error_goal: Annotated[
        bool, typer.Option("--no-error-goal", help="Only training-loss goals (no test-error goal).")
    ] = False,
    lr_max: Annotated[
        float | None, typer.Option(help="epsilon_max of the rule lr_max/(1 + lr_b_star/B).")
    ] = None,
    lr_b_star: Annotated[
        float | None, typer.Option(help="B_* of the learning-rate rule, in the task's unit.")
    ] = None,
    lr_points: Annotated[
        int | None, typer.Option(help="Learning rates per batch size before widening.")
    ] = None,
    lr_step: Annotated[float | None, typer.Option(help="Ratio between neighbouring learning rates.")] = None,
    max_widenings: Annotated[
        int | None, typer.Option(help="Extra learning rates per batch size at most.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Step budget of a run.")] = None,
    max_examples: Annotated[
        int | None, typer.Option(help="Example budget of a run (steps: max_examples/B, clipped).")
    ] = None,
    min_steps: Annotated[int | None, typer.Option(help="Smallest step budget of a run.")] = None,
    method: Annotated[SweepMethodName, typer.Option(help="Noise-scale estimator.")] = _DEFAULT_METHOD,
    microbatches: Annotated[
        int | None, typer.Option(help="Micro-batches per step (microbatch method: >= 2, default 2).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Initial weights and data stream of every run.")] = 0,
    seeds: Annotated[
        int | None, typer.Option(help="Seeds per run, trained in lockstep (RL tasks; default 3).", min=1)
    ] = None,
    bootstrap: BootstrapOption = 1000,
    confidence: ConfidenceOption = 0.95,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
    executor: Annotated[
        ExecutorName,
        typer.Option(help="local: a pool of --jobs processes; ray: one Ray task (one CPU) per run."),
    ] = ExecutorName.local,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (--executor ray; default: RAY_ADDRESS, else a local one)."),
    ] = None,
) -> None:
    """Measure B_crit of a built-in task with a batch-size sweep, next to its B_simple.

    Example: noisescale sweep --task mnist --out runs/sweep-mnist --jobs 2
    """
    start = time.perf_counter()
    try:
        if no_error_goal and error_goal:
            raise ValueError("give --error-goal or --no-error-goal, not both")
        config = SweepConfig.for_task(
            task.value,
            batch_sizes=batch_size or None,
            loss_goals=loss_goal or None,
            validation_loss_goals=validation_loss_goal or None,
            error_goals=[] if no_error_goal else error_goal or None,
            return_goals=return_goal or None,
            lr_max=lr_max,
            lr_b_star=lr_b_star,
            lr_points=lr_points,
            lr_step=lr_step,
            max_widenings=max_widenings,
            max_steps=max_steps,
            max_examples=max_examples,
            min_steps=min_steps,
            method=method.value,
            microbatches=_microbatches(method.value, microbatches),
            seed=seed,
            seeds=seeds,
        )
    except (NoiseScaleError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    if address is not None and executor is not ExecutorName.ray:
        raise fail("--address is the Ray cluster's: add --executor ray", 2)
    folder = out if out is not None else Path("runs") / f"sweep-{config.task}"
    where = _Where(jobs or _default_jobs(), executor.value, address)
    result = _run(config, folder, where, bootstrap, confidence, progress)
    console = output_console()
    console.print(report_table(result.report, title=f"critical batch size: {config.task}"))
    for line in report_notes(result.report):
        console.print(line)
    err = Console(stderr=True, highlight=False, markup=False)
    err.print(
        f"{len(result.records)} runs ({result.trained} trained now) in {time.perf_counter() - start:.0f} s; "
        f"wrote {', '.join(p.name for p in result.files)} in {folder}"
    )


class _Where(NamedTuple):
    """Where the runs train."""

    jobs: int
    executor: Executor
    address: str | None

    def describe(self) -> str:
        return f"{self.jobs} jobs" if self.executor == "local" else "on Ray"


def _run(
    config: SweepConfig, folder: Path, where: _Where, bootstrap: int, confidence: float, show: bool
) -> SweepResult:
    """Run the sweep with a progress bar over the runs; errors become one line and an exit code."""
    err = Console(stderr=True, highlight=False)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=not show, transient=True) as bar:
        task_id = bar.add_task("runs", total=0)

        def on_plan(specs: list[RunSpec]) -> None:
            total = bar.tasks[0].total or 0
            bar.update(task_id, total=total + len(specs), description=f"runs ({where.describe()})")

        def on_record(spec: RunSpec, record: RunRecord) -> None:
            bar.advance(task_id)
            if show:
                bar.console.print(_describe(spec, record))

        try:
            return run_sweep(
                config, folder, jobs=where.jobs, on_record=on_record, on_plan=on_plan,
                n_bootstrap=bootstrap, confidence=confidence, executor=where.executor, address=where.address,
            )  # fmt: skip
        except BrokenProcessPool:
            msg = f"a worker process died (out of memory?); finished runs are saved in {folder}/runs"
            msg += ": re-run the same command to resume"
            raise fail(msg, 1) from None
        except KeyboardInterrupt:
            msg = f"interrupted: finished runs are saved in {folder}/runs; re-run the same command to resume"
            raise fail(msg, 130) from None
        except NoiseScaleError as exc:
            raise fail(str(exc), 1 if isinstance(exc, DatasetNotFoundError) else 2) from None
