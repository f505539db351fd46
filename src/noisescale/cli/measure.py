"""``noisescale measure``: train a built-in task while measuring its gradient noise scale.

Usage::

    noisescale measure                                   # MNIST, per-example norms, runs/mnist
    noisescale measure --task linreg                     # the oracle: also prints the true value
    noisescale measure --task digits --method microbatch --microbatches 4 --out runs/digits
    noisescale measure --task shakespeare --only layernorm   # a transformer's LayerNorms only (cheap)
    noisescale measure --task cartpole                   # A2C on CartPole: policy and value groups
    noisescale measure --task linreg --b-noise                # B_noise (eq. 2.8) from Hessian-vector products
    noisescale measure --task mnist --adaptive --batch-size 32   # the batch grows with B_simple
    torchrun --standalone --nproc_per_node=2 -m noisescale measure --task digits --fsdp   # FSDP2

It shows a progress bar, then a table of B_simple with its interval, |G|^2, tr(Sigma),
the loss, the learning rate and batch size (the temperature lr/B), and whether the
noise scale is resolved. It writes into ``--out`` (default ``runs/<task>``), each file
atomically:

- ``metrics.jsonl``: one record per step: ``step``, ``examples``, ``loss`` (the step's batch),
  ``lr``, ``batch_size``, ``grad_norm_sq``, ``trace_sigma``, ``b_simple``, ``b_simple_ci``,
  ``b_simple_se``, ``resolved``, ``wall_time``.
- ``summary.json``: the settings (``task``, ``unit``, ``method``, ``batch_size``, ``microbatches``,
  ``lr``, ``temperature``, ``seed``, ``ema_decay``, ``ema_examples``, ``threads``...), the final
  estimate (``b_simple``, ``b_simple_ci`` as ``[low, high]``, ``grad_norm_sq``, ``trace_sigma``,
  ``resolved``, per-group values), ``loss`` (training loss on a fixed subset of at most 10,000
  examples, at the end), ``test_loss`` and ``test_error`` on the held-out set (``held_out``: the
  test set, or the validation plays of ``shakespeare``, whose losses are in nats per token and
  ``test_bpc`` in bits per character), ``wall_time_s``; for ``linreg`` also ``b_simple_true`` and
  ``b_noise_true``; ``flops_per_example`` (forward + backward, torch's flop counter, per unit of
  the batch size); for ``cartpole`` the returns instead of losses (``mean_return`` of the last
  ``return_window`` episodes, ``episodes``), each group's run mean (``group_run_means``) and the A2C
  settings. Every batch size is in ``unit`` (images, examples, tokens, observations).
- with ``--b-noise``: B_noise probed every ``--b-noise-every`` steps and after the last
  (:mod:`noisescale.experiments.b_noise_probe`): ``b_noise``, ``b_noise_ci``, ``eps_max``,
  ``b_noise_reason`` and the whole last probe (``b_noise_probe``) in ``summary.json`` (``linreg``:
  also ``eps_max_true``, ``b_noise_ci_contains_true``), and ``b_noise``, ``b_noise_ci``, ``eps_max``,
  ``g_h_g``, ``trace_h_sigma`` in the ``metrics.jsonl`` records of the probed steps.
- ``noise_scale.png``: B_simple with its band, and the loss, against examples seen.

With ``--adaptive`` the batch follows the noise scale
(:class:`~noisescale.control.controller.BatchSizeController`, :mod:`noisescale.experiments.adaptive`):
the micro-batch stays ``--batch-size / --microbatches`` and the number of micro-batches grows by
integer factors, up to ``--max-batch-size``; the progress bar shows the batch, ``summary.json`` gets
``batch_schedule`` (one record per change, ``{"step", "examples", "batch_size", "lr"}``, starting
with the initial batch), ``adaptive`` (the settings) and ``micro_batch_size``, and ``batch_size.png``
draws the batch against examples seen.

A B_simple that is not resolved prints as "not resolved" and is ``null`` in JSON. A missing
dataset or a bad option prints one line saying what to do and exits with status 1 or 2.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import noisescale.distributed as nsdist
from noisescale.cli.common import (
    DEFAULT_TASK,
    MethodName,
    OnlyName,
    OptimizerName,
    TaskName,
    check_writable,
    fail,
)
from noisescale.cli.measure_table import fmt, measure_table
from noisescale.critical.goals import run_mean
from noisescale.errors import NoiseScaleError
from noisescale.experiments.adaptive import AdaptiveSettings, policy_of
from noisescale.experiments.b_noise_probe import BNoiseProbe
from noisescale.experiments.evaluation import bits, evaluate, train_loss
from noisescale.experiments.plotting import plot_batch_schedule, plot_run
from noisescale.experiments.records import StepRecord
from noisescale.experiments.rl import RL_TASK_NAMES, RLTask, get_rl_task, rl_results, train_rl
from noisescale.experiments.tasks import Task, get_task
from noisescale.experiments.training import TrainConfig, TrainResult, train
from noisescale.flops import flops_per_example
from noisescale.io import package_version, write_json, write_jsonl
from noisescale.meter import NoiseScaleEstimate

__all__ = ["measure"]


def _run_with_progress(
    task: Task | RLTask,
    config: TrainConfig,
    console: Console,
    show: bool,
    dist: nsdist.DistInfo | None = None,
    probe: BNoiseProbe | None = None,
    adaptive: AdaptiveSettings | None = None,
) -> TrainResult:
    """Train with a rich progress bar showing the loss, the current B_simple and the batch size."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  B_simple {task.fields[b_simple]}  batch {task.fields[batch]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not show, transient=False) as progress:
        bar = progress.add_task(f"{task.name}", total=config.steps, loss="-", b_simple="-", batch="-")

        def on_step(record: StepRecord) -> None:
            est = record.estimate
            b = "not resolved" if est is None or est.b_simple is None else fmt(est.b_simple)
            progress.update(bar, advance=1, loss=f"{record.loss:.4f}", b_simple=b, batch=record.batch_size)

        if isinstance(task, RLTask):  # one process, no probe, no adaptive batch (refused before)
            return train_rl(task, config, callback=on_step)
        return train(task, config, callback=on_step, stop=probe, dist=dist, adaptive=adaptive)


def _summary(
    task: Task | RLTask, config: TrainConfig, result: TrainResult, wall_time: float
) -> dict[str, Any]:
    """The summary.json content: settings, final estimate, then the task's results (:func:`_results`)."""
    est = result.estimate
    assert est is not None, "measure always trains with a meter"
    # McCandlish et al. (2018), Table 1 reports B_simple averaged over the run: the step-weighted
    # mean of the resolved smoothed values, the run average of a sweep (critical.goals.run_mean);
    # a rough comparison, not an estimate of B_crit.
    measured = [(r.step, r.estimate) for r in result.records if r.estimate is not None]
    values = [e.b_simple for _, e in measured]  # the meter's: None unless resolved
    mean = run_mean([step for step, _ in measured], values, upto=measured[-1][0]) if measured else None
    pre = [None if e.preconditioned is None else e.preconditioned.b_simple for _, e in measured]
    pre_mean = run_mean([step for step, _ in measured], pre, upto=measured[-1][0]) if measured else None
    resolved = sum(v is not None for v in values)
    summary: dict[str, Any] = {
        "task": task.name,
        "unit": task.unit,
        "method": config.method,
        "world_size": nsdist.world_size(),
        "batch_size": config.batch_size,
        "microbatches": config.microbatches,
        "lr": config.lr,
        "temperature": config.lr / config.batch_size,
        "momentum": config.momentum,
        "optimizer": config.optimizer,
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "only": config.only,
        "steps": len(result.records),
        "examples": result.records[-1].examples if result.records else 0,
        "seed": config.seed,
        "ema_decay": config.ema_decay,
        "ema_examples": config.ema_examples,
        "confidence": config.confidence,
        "threads": torch.get_num_threads(),
        # The meter's: null unless resolved (the parts |G|^2 and tr Sigma are still reported).
        "b_simple": est.b_simple,
        "b_simple_ci": None if est.b_simple_ci is None else list(est.b_simple_ci),
        "b_simple_se": est.b_simple_se,
        "grad_norm_sq": est.grad_norm_sq,
        "trace_sigma": est.trace_sigma,
        "resolved": est.resolved,
        "contradiction": est.contradiction,  # null, or why the records are impossible and what to check
        "n_eff": est.n_eff,
        "skipped_steps": est.skipped_steps,  # non-finite gradients (e.g. divergence): never averaged in
        "b_simple_run_mean": mean,
        # Under Adam: the preconditioned estimate (G^T P G, tr(P Sigma), B_P), null otherwise.
        "preconditioned": None if est.preconditioned is None else _preconditioned(est.preconditioned),
        "b_simple_preconditioned_run_mean": pre_mean,
        "resolved_steps": resolved,
        **(rl_results(task, result) if isinstance(task, RLTask) else _results(task, config, result)),
        "wall_time_s": wall_time,
        "train_time_s": result.wall_time,
        "groups": {name: g.to_dict() for name, g in est.groups.items()},
        "versions": {
            "noisescale": package_version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    return summary


def _results(task: Task, config: TrainConfig, result: TrainResult) -> dict[str, Any]:
    """A supervised run's part of the summary: losses, test error, FLOPs and (linreg) the truth."""
    test_loss, test_error = evaluate(task, result.model)
    summary: dict[str, Any] = {
        "loss": train_loss(task, result.model),
        "held_out": task.held_out,
        "test_loss": test_loss,
        "test_bpc": bits(test_loss) if task.unit == "tokens" else None,
        "test_error": test_error,
        "flops_per_example": _flops_per_example(task, result.model, config.batch_size),
    }
    if task.truth is not None:
        truth = task.truth(result.model)
        summary.update(
            b_simple_true=truth["b_simple"],
            b_noise_true=truth["b_noise"],
            grad_norm_sq_true=truth["grad_norm_sq"],
            trace_sigma_true=truth["trace_sigma"],
            loss_true=truth["loss"],
        )
        ci = None if result.estimate is None else result.estimate.b_simple_ci
        summary["ci_contains_true"] = None if ci is None else bool(ci[0] <= truth["b_simple"] <= ci[1])
    return summary


def _preconditioned(pre: NoiseScaleEstimate) -> dict[str, Any]:
    """The summary's ``preconditioned``: B_P with its interval, G^T P G, tr(P Sigma), resolved."""
    keys = {
        "b_simple",
        "b_simple_ci",
        "b_simple_se",
        "grad_norm_sq",
        "trace_sigma",
        "resolved",
        "skipped_steps",
    }
    return {k: v for k, v in pre.to_dict().items() if k in keys}


def _flops_per_example(task: Task, model: torch.nn.Module, batch_size: int) -> float:
    """FLOPs of a forward + backward per unit of the batch size, on the first test examples."""
    device = next(model.parameters()).device
    n = max(1, batch_size // task.units_per_example)  # rows: examples, or windows of T tokens
    x, y = task.x_test[:n].to(device), task.y_test[:n].to(device)
    return flops_per_example(model, task.loss_fn, x, y, examples=len(y) * task.units_per_example)


def _write_outputs(
    task: Task | RLTask,
    config: TrainConfig,
    result: TrainResult,
    out_dir: Path,
    start: float,
    probe: BNoiseProbe | None = None,
    adaptive: AdaptiveSettings | None = None,
) -> dict[str, Any]:
    """Write metrics.jsonl, noise_scale.png, summary.json (and batch_size.png) atomically; the summary."""
    summary = _summary(task, config, result, time.perf_counter() - start)
    if probe is not None and isinstance(task, Task):
        summary.update(probe.summary(task.truth(result.model) if task.truth is not None else None))
    records = [{**r.to_dict(), **(probe.record_fields(r.step) if probe else {})} for r in result.records]
    write_jsonl(out_dir / "metrics.jsonl", records)
    title = f"{task.name}: {config.method}, B={config.batch_size} {task.unit}, lr={config.lr:g}"
    if adaptive is not None and result.batch_schedule is not None:
        summary.update(
            batch_schedule=[change.to_dict() for change in result.batch_schedule],
            adaptive=dataclasses.asdict(adaptive),
            micro_batch_size=config.batch_size // config.microbatches,
        )
        plot_batch_schedule(records, out_dir / "batch_size.png", title=f"{title}, adaptive", unit=task.unit)
    plot_run(
        records,
        out_dir / "noise_scale.png",
        title=f"{title}, seed {config.seed}",
        unit=task.unit,
        b_simple_true=summary.get("b_simple_true"),
        confidence=config.confidence,
        **({"metric": "mean_return", "metric_label": "mean return"} if isinstance(task, RLTask) else {}),
    )
    summary["wall_time_s"] = time.perf_counter() - start
    write_json(out_dir / "summary.json", summary)
    return summary


def measure(
    task: Annotated[TaskName, typer.Option(help="Built-in task to train.")] = DEFAULT_TASK,
    method: Annotated[
        MethodName | None,
        typer.Option(
            help="per-example: exact per-example norms; microbatch: k-way estimator; ddp: k-way over "
            "replicas x micro-batches (default under torchrun; else per-example); fsdp: the same under "
            "--fsdp (its default)."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step (default: the task's).")] = None,
    microbatches: Annotated[
        int | None,
        typer.Option(help="Micro-batches per step (default 1 for per-example, the task's for microbatch)."),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the task's).")] = None,
    optimizer: Annotated[
        OptimizerName | None, typer.Option(help="sgd or adamw (default: the task's; adamw for shakespeare).")
    ] = None,
    only: Annotated[
        OnlyName,
        typer.Option(
            help="all: every parameter; layernorm: the LayerNorm parameters only (hooks nothing else)."
        ),
    ] = OnlyName.all,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: the task's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the data stream.")] = 0,
    ema_decay: Annotated[
        float | None, typer.Option(help="Per-step decay of the averages (1 = plain mean).")
    ] = None,
    ema_examples: Annotated[
        float | None, typer.Option(help="Averaging time constant in examples (instead of --ema-decay).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch CPU threads (default: 2; under torchrun, the cores per rank on this machine)."
        ),
    ] = None,
    adaptive: Annotated[
        bool, typer.Option(help="Grow the batch with B_simple (integer factors of the micro-batches).")
    ] = False,
    max_batch_size: Annotated[
        int | None, typer.Option(help="With --adaptive: the largest batch (default: no limit).")
    ] = None,
    critical_factor: Annotated[
        float | None, typer.Option(help="With --adaptive: track B = c B_simple (default c = 1).")
    ] = None,
    exchange_rate: Annotated[
        float | None, typer.Option(help="With --adaptive: track B = sqrt(r B_simple) (r: units per step).")
    ] = None,
    max_lr: Annotated[
        float | None, typer.Option(help="With --adaptive: never raise the learning rate above this.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (default: runs/<task>).")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    fsdp: Annotated[
        bool,
        typer.Option("--fsdp", help="Under torchrun: shard the model with fully_shard (FSDP2), not DDP."),
    ] = False,
    b_noise: Annotated[
        bool, typer.Option(help="Probe B_noise (eq. 2.8) with Hessian-vector products; one process only.")
    ] = False,
    b_noise_every: Annotated[
        int | None, typer.Option(help="Steps between B_noise probes (default: a quarter of --steps).")
    ] = None,
    b_noise_batches: Annotated[int, typer.Option(help="Batches per B_noise probe.")] = 64,
) -> None:
    """Train a built-in task while measuring its gradient noise scale B_simple.

    Example: noisescale measure --task linreg --steps 500 --out runs/linreg
    """
    start = time.perf_counter()
    info = nsdist.init_from_env()  # torchrun with >= 2 processes: DDP over gloo (CPU) or nccl
    parallel = "fsdp" if fsdp else "ddp"
    chosen = method.value if method is not None else (parallel if info is not None else "per-example")
    try:
        if threads is None:  # torchrun leaves OMP_NUM_THREADS=1; W ranks x 2 threads would oversubscribe
            ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            threads = 2 if info is None else max(1, (os.cpu_count() or 2) // ranks_here)
        torch.set_num_threads(threads)
        the_task = get_rl_task(task.value) if task.value in RL_TASK_NAMES else get_task(task.value)
        alone = info is None and only is OnlyName.all and not (b_noise or adaptive)
        if isinstance(the_task, RLTask) and not alone:
            raise ValueError(
                f"--task {task.value} trains in one process with its own groups (policy, value): "
                "run it without torchrun, --only, --b-noise and --adaptive"
            )
        config = TrainConfig.for_task(
            the_task,
            method=chosen,
            batch_size=batch_size,
            microbatches=microbatches,
            lr=lr,
            optimizer=None if optimizer is None else optimizer.value,
            only=None if only is OnlyName.all else only.value,
            steps=steps,
            seed=seed,
            ema_decay=ema_decay,
            ema_examples=ema_examples,
            threads=threads,
            fsdp=fsdp,
        )
        if config.steps < 1:
            raise ValueError("--steps must be at least 1")
        if (chosen in ("ddp", "fsdp") or config.fsdp) and info is None:
            given = [f"--method {chosen}"] * (method is not None) + ["--fsdp"] * fsdp
            raise ValueError(
                f"{' '.join(given)} needs torchrun with 2 or more processes (torchrun --nproc_per_node=2 ...)"
            )
        if info is not None and config.method == "per_example" and config.units_per_example > 1:
            raise ValueError("under torchrun a task in tokens is measured with --method ddp (the default)")
        probe = None
        if b_noise and isinstance(the_task, Task):
            if info is not None:
                raise ValueError("--b-noise probes in one process: run it without torchrun")
            probe = BNoiseProbe(
                the_task,
                config.batch_size,
                microbatches=config.microbatches if config.microbatches >= 3 else 4,
                batches=b_noise_batches,
                every=max(1, config.steps // 4) if b_noise_every is None else b_noise_every,
                last_step=config.steps,
                seed=seed,
            )
        settings = None
        if adaptive:
            settings = AdaptiveSettings(max_batch_size, critical_factor, exchange_rate, max_lr=max_lr)
            policy_of(settings, config, nsdist.world_size())  # bad settings fail now, not after start-up
        elif (max_batch_size, critical_factor, exchange_rate, max_lr) != (None, None, None, None):
            raise ValueError(
                "--max-batch-size, --critical-factor, --exchange-rate and --max-lr need --adaptive"
            )
        out_dir = out if out is not None else Path("runs") / the_task.name
        if nsdist.is_rank_zero():  # fail now, not after training
            check_writable(out_dir)
    except NoiseScaleError as exc:  # a missing dataset
        raise fail(str(exc), 1) from None
    except (ValueError, RuntimeError) as exc:  # a bad option
        raise fail(str(exc), 2) from None
    try:
        result = _run_with_progress(
            the_task, config, Console(stderr=True), progress and nsdist.is_rank_zero(), info, probe, settings
        )
    except NoiseScaleError as exc:  # e.g. a layer without a per-example kernel
        raise fail(str(exc), 1) from None
    if not nsdist.is_rank_zero():  # rank 0 alone evaluates (the unwrapped model), writes and prints
        nsdist.close()
        return
    summary = _write_outputs(the_task, config, result, out_dir, start, probe, settings)
    Console().print(measure_table(summary))
    extra = ", batch_size.png" if settings is not None else ""
    Console(stderr=True).print(f"wrote {out_dir}/metrics.jsonl, summary.json, noise_scale.png{extra}")
    nsdist.close()
