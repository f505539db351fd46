"""Training the runs of a sweep: one run to its goals, and many in parallel processes.

Each run trains until it has reached every goal (training-loss levels on a fixed subset of the
training set, validation-loss levels and test-error levels on a fixed subset of the held-out set:
the :class:`Probe` of :mod:`noisescale.experiments.evaluation`), its loss (the held-out one where
evaluated, else the training one) diverges or stalls, or its step budget
(``max_examples / B`` steps within ``[min_steps, max_steps]``) is spent. The goals are checked
on a geometric schedule of steps (every ``eval_growth - 1`` of the steps done, e.g. 10%); the
steps to a goal follow the one rule of :mod:`noisescale.critical.goals` (interpolated between
the checks around the crossing, which bracket it). The meter of :mod:`noisescale.meter`
(per-example norms) runs in the same runs; the run-averaged B_simple to a goal is the
step-weighted mean, over the steps up to it, of the meter's smoothed B_simple
(:func:`noisescale.critical.goals.run_mean`; McCandlish et al. 2018, appendix D).

An RL run (:func:`train_rl_run`) trains ``seeds`` agents in lockstep, one per seed. Its metric
``mean_return`` at a check is the median over the seeds of each agent's best mean return so far
(the mean of its last ``return_window`` training episodes, after any update; no evaluation
episodes): each seed's best-so-far curve is monotone, so the median curve reaches a goal at the
median of the seeds' steps to it, the usual "steps to a score, median over seeds" of RL, robust to
A2C's collapses after a peak. Its B_simple at a check is the mean of the seeds' resolved values,
in total and per group (policy, value). It stops when every goal is reached, or at its budget.

Runs are deterministic given the seed (one torch thread each), so a resumed sweep ends with
the same records as an uninterrupted one, whatever the number of parallel jobs, and whether they
ran in local processes or as Ray tasks (:mod:`noisescale.experiments.sweep.on_ray`).

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    appendix A.2-A.3 and D.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Literal

import torch

from noisescale.critical.goals import HIGHER_IS_BETTER, GoalCrossing, crossing, meets, run_mean
from noisescale.errors import SweepConfigError, SweepDataError
from noisescale.experiments.evaluation import Probe
from noisescale.experiments.rl import RL_TASK_NAMES, RLTask, RLTrainer, get_rl_task
from noisescale.experiments.sweep.config import Goal, RunSpec, SweepConfig
from noisescale.experiments.sweep.store import CurvePoint, GoalRecord, RunRecord, write_record
from noisescale.experiments.tasks import Task, get_task
from noisescale.experiments.training import Trainer

__all__ = ["EXECUTORS", "Executor", "execute_runs", "goal_crossing", "run_one", "train_rl_run", "train_run"]

Executor = Literal["local", "ray"]
"""Where a sweep's runs train: ``local`` processes (a process pool), or ``ray`` tasks on a Ray cluster."""
EXECUTORS: tuple[Executor, ...] = ("local", "ray")

_DIVERGED = 3.0  # a training loss above this many times the initial one counts as diverged
# A run is "stalled" when its loss is still above _STALL_LOSS times the initial one after
# _STALL_FRACTION of its budget and at least _STALL_MIN_STEPS steps (a conv net may sit on a
# plateau for its first tens of steps).
_STALL_LOSS = 0.9
_STALL_FRACTION = 0.05
_STALL_MIN_STEPS = 100


def goal_crossing(curve: Sequence[CurvePoint], goal: Goal, run: str = "") -> GoalCrossing:
    """:func:`noisescale.critical.goals.crossing` of a run's checks for one goal.

    Raises:
        SweepDataError: if the goal is met at step 0 (naming the run and the goal).
    """
    try:
        values = [p.value(goal.metric) for p in curve]
        return crossing([p.step for p in curve], values, goal.level, above=goal.metric in HIGHER_IS_BETTER)
    except SweepDataError as exc:
        raise SweepDataError(f"run {run}: {goal.metric} {exc}") from None


def train_run(task: Task, config: SweepConfig, spec: RunSpec) -> RunRecord:
    """Train one run of the sweep until it reaches every goal, diverges or spends its budget.

    Args:
        task: the task named by ``config.task``.
        config: the sweep.
        spec: batch size and learning-rate index of the run.

    Returns:
        The run's record: why it stopped ("goals", "budget", "diverged" or "stalled"), per goal
        the steps to it (None when censored at ``steps_run``) and the run-averaged B_simple to
        it, the checks, and the wall time.
    """
    start = time.perf_counter()
    if config.units_per_example != task.units_per_example:
        raise SweepConfigError(
            f"units_per_example={config.units_per_example} but an example of {task.name!r} is "
            f"{task.units_per_example} {task.unit}: leave units_per_example to the task's defaults"
        )
    train_config = config.train_config(spec.batch_size, spec.lr(config))
    budget = train_config.steps
    probe = Probe(task, config.eval_examples, config.eval_test_examples)
    goals = config.goals
    done = [False] * len(goals)
    curve: list[CurvePoint] = []
    stopped, next_check, first = "budget", 0, None
    with Trainer(task, train_config) as trainer:
        for step in range(budget + 1):
            if step:
                trainer.step()
            if step < next_check and step < budget:
                continue
            next_check = max(step + 1, math.ceil(step * config.eval_growth))
            point = _check(trainer, probe, step, goals, done)
            curve.append(point)
            first = point if first is None else first
            late = step >= max(budget * _STALL_FRACTION, _STALL_MIN_STEPS)
            verdict = _hopeless(point, first, late=late)
            if verdict is not None:
                stopped = verdict
                break
            if all(done):
                stopped = "goals"
                break
    return _record(config, spec, task.unit, budget, curve, stopped, time.perf_counter() - start)


def _check(trainer: Trainer, probe: Probe, step: int, goals: list[Goal], done: list[bool]) -> CurvePoint:
    """Evaluate the metrics still needed and the meter at one check; marks the goals reached."""
    need = {g.metric for g, d in zip(goals, done, strict=True) if not d}
    loss = probe.train_loss(trainer.model) if "train_loss" in need or step == 0 else None
    held_out = probe.test(trainer.model) if need & {"validation_loss", "test_error"} else (None, None)
    error = held_out[1] if "test_error" in need else None
    point = CurvePoint(step, loss, error, validation_loss=held_out[0] if "validation_loss" in need else None)
    est = trainer.estimate() if step else None
    if est is not None and est.steps:  # the meter's b_simple is None unless resolved
        point = point._replace(
            measured=True, b_simple=est.b_simple, grad_norm_sq=est.grad_norm_sq, trace_sigma=est.trace_sigma
        )
        if est.preconditioned is not None:  # under Adam
            point = point._replace(b_simple_preconditioned=est.preconditioned.b_simple)
    _mark(point, goals, done)
    return point


def _mark(point: CurvePoint, goals: list[Goal], done: list[bool]) -> None:
    """Mark the goals a check (after step 0) reaches."""
    for i, g in enumerate(goals):
        value = point.value(g.metric)
        done[i] = done[i] or (value is not None and point.step > 0 and meets(g.metric, value, g.level))


def train_rl_run(task: RLTask, config: SweepConfig, spec: RunSpec) -> RunRecord:
    """One run of an RL sweep: ``config.seeds`` agents in lockstep until their mean return reaches the goals.

    Args:
        task: the RL task named by ``config.task``.
        config: the sweep.
        spec: batch size (observations) and learning-rate index of the run.

    Returns:
        The run's record, as :func:`train_run`'s ("goals" or "budget"); its curve holds the
        median over the seeds of the best mean return so far, and the mean of the resolved
        B_simple (total and per group).
    """
    start = time.perf_counter()
    base = config.train_config(spec.batch_size, spec.lr(config))
    goals, done = config.goals, [False] * len(config.goals)
    curve: list[CurvePoint] = []
    stopped, next_check = "budget", 0
    with contextlib.ExitStack() as stack:
        agents = [
            stack.enter_context(RLTrainer(task, dataclasses.replace(base, seed=config.seed + i)))
            for i in range(config.seeds)
        ]
        for step in range(base.steps + 1):
            if step:
                for agent in agents:
                    agent.step()
            if step < next_check and step < base.steps:
                continue
            next_check = max(step + 1, math.ceil(step * config.eval_growth))
            curve.append(_rl_check(agents, step))
            _mark(curve[-1], goals, done)
            if all(done):
                stopped = "goals"
                break
    return _record(config, spec, task.unit, base.steps, curve, stopped, time.perf_counter() - start)


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _rl_check(agents: Sequence[RLTrainer], step: int) -> CurvePoint:
    """The median of the seeds' best mean return (None until every seed has one) and their meters."""
    best = [a.best_return for a in agents if a.best_return is not None]
    median = statistics.median(best) if len(best) == len(agents) else None
    point = CurvePoint(step, None, None, mean_return=median)
    if not step:
        return point
    ests = [a.meter.compute() for a in agents if a.meter is not None]
    if not ests:
        return point
    groups = {name: _mean([e.groups[name].b_simple for e in ests]) for name in ests[0].groups}
    return point._replace(
        measured=True,
        b_simple=_mean([e.b_simple for e in ests]),
        grad_norm_sq=statistics.fmean(e.grad_norm_sq for e in ests),
        trace_sigma=statistics.fmean(e.trace_sigma for e in ests),
        groups=groups,
    )


def _hopeless(point: CurvePoint, first: CurvePoint, *, late: bool) -> str | None:
    """Why a run cannot be the fastest to any goal, or None.

    The loss is the check's watched loss (:attr:`CurvePoint.loss`), against the same loss at
    the first check. ``"diverged"``: a non-finite loss or one above ``_DIVERGED`` times the initial loss.
    ``"stalled"``: still above 90% of the initial loss after 5% of the budget and at least 100
    steps (``late``), e.g. a network whose units all died at a too large learning rate (its
    loss stays at log(classes)).
    """
    loss = point.loss
    initial = first.train_loss if point.validation_loss is None else first.validation_loss
    if loss is None or initial is None:
        return None
    if not math.isfinite(loss) or loss > _DIVERGED * initial:
        return "diverged"
    return "stalled" if late and loss > _STALL_LOSS * initial else None


def _averages(curve: Sequence[CurvePoint], upto: float) -> tuple[float | None, float | None, float | None]:
    """Run-averaged B_simple to ``upto``, tr(Sigma)/|G|^2 of the run averages, preconditioned B_simple.

    The last is None without a preconditioner (SGD).
    """
    steps = [p.step for p in curve]
    mean = run_mean(steps, [p.b_simple for p in curve], upto)
    pre = run_mean(steps, [p.b_simple_preconditioned for p in curve], upto)
    both = [p.grad_norm_sq is not None and p.trace_sigma is not None for p in curve]
    tr = run_mean(steps, [p.trace_sigma if ok else None for p, ok in zip(curve, both, strict=True)], upto)
    g2 = run_mean(steps, [p.grad_norm_sq if ok else None for p, ok in zip(curve, both, strict=True)], upto)
    return mean, (tr / g2 if tr is not None and g2 is not None and g2 > 0 else None), pre


def _record(
    config: SweepConfig,
    spec: RunSpec,
    unit: str,
    budget: int,
    curve: list[CurvePoint],
    stopped: str,
    wall: float,
) -> RunRecord:
    """The record of a finished run (see :func:`train_run`)."""
    steps_run = curve[-1].step
    name = spec.name(config)
    per_goal = []
    for g in config.goals:
        c = _safe_crossing(curve, g, name)
        hit = c if c is not None and c.reached else None
        steps = None if hit is None else hit.steps
        mean, ratio, pre = _averages(curve, steps if steps is not None else steps_run)
        per_goal.append(
            GoalRecord(
                metric=g.metric,
                goal=g.level,
                reached=steps is not None,
                steps=steps,
                examples=None if steps is None else steps * spec.batch_size,
                b_simple=mean,
                b_simple_ratio=ratio,
                steps_low=None if hit is None else hit.low,
                steps_high=None if hit is None else hit.high,
                b_simple_preconditioned=pre,
            )
        )
    mean, ratio, pre = _averages(curve, steps_run)
    final = next((p.train_loss for p in reversed(curve) if p.train_loss is not None), None)
    return RunRecord(
        name=name,
        batch_size=spec.batch_size,
        lr=spec.lr(config),
        lr_index=spec.lr_index,
        seed=config.seed,
        unit=unit,
        steps_budget=budget,
        steps_run=steps_run,
        examples_run=steps_run * spec.batch_size,
        stopped=stopped,
        goals=tuple(per_goal),
        b_simple=mean,
        b_simple_ratio=ratio,
        final_train_loss=final,
        curve=tuple(curve),
        wall_time_s=wall,
        b_simple_preconditioned=pre,
    )


def _safe_crossing(curve: Sequence[CurvePoint], goal: Goal, name: str) -> GoalCrossing | None:
    """The crossing, or None when the goal is met at step 0 (the results table says so)."""
    try:
        return goal_crossing(curve, goal, name)
    except SweepDataError:
        return None


@lru_cache(maxsize=2)
def _cached_task(name: str) -> Task | RLTask:
    """The task, loaded once per process (a worker trains many runs of it)."""
    return get_rl_task(name) if name in RL_TASK_NAMES else get_task(name)


def run_one(config_values: dict[str, Any], spec: tuple[int, int], out: str) -> RunRecord:
    """Train one run and write its record atomically to ``<out>/runs/<B>_<lr>.json``.

    The entry point of the worker processes: arguments are plain values so that it pickles.
    One torch thread per run makes the result independent of the number of parallel jobs.

    Args:
        config_values: :meth:`SweepConfig.to_dict`.
        spec: ``(batch_size, lr_index)``.
        out: the sweep directory.

    Returns:
        The record written.
    """
    config = SweepConfig.from_dict(config_values)
    run = RunSpec(*spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = _cached_task(config.task)
        record = train_rl_run(task, config, run) if isinstance(task, RLTask) else train_run(task, config, run)
    finally:
        torch.set_num_threads(threads)
    write_record(out, config, record)
    return record


def execute_runs(
    config: SweepConfig,
    specs: Sequence[RunSpec],
    out: str,
    *,
    jobs: int = 1,
    on_record: Callable[[RunSpec, RunRecord], None] | None = None,
    executor: Executor = "local",
    address: str | None = None,
) -> dict[RunSpec, RunRecord]:
    """Train ``specs`` (largest batch sizes first), ``jobs`` at a time, each writing its record.

    With ``jobs > 1`` the runs go to a pool of spawned processes with one torch thread each;
    with ``jobs == 1`` they run in this process, also with one thread (the same results).
    With ``executor="ray"`` each run is a Ray task of one CPU instead (``jobs`` is then Ray's
    to choose: :func:`noisescale.experiments.sweep.on_ray.execute_on_ray`).

    Args:
        config: the sweep.
        specs: runs to train.
        out: the sweep directory (under Ray, on storage every worker sees).
        jobs: parallel processes (``local``).
        on_record: called in this process with every finished run (progress, tests).
        executor: ``"local"`` or ``"ray"``.
        address: the Ray cluster's address (``ray``; default: the running one, ``RAY_ADDRESS``,
            or a new local one).

    Returns:
        The records of the runs trained.
    """
    order = sorted(specs, key=lambda s: (-s.batch_size, s.lr_index))
    values, done = config.to_dict(), {}
    if executor == "ray":
        from noisescale.experiments.sweep.on_ray import execute_on_ray

        return execute_on_ray(values, order, str(out), address=address, on_record=on_record)
    if jobs <= 1 or len(order) <= 1:
        for spec in order:
            done[spec] = run_one(values, (spec.batch_size, spec.lr_index), str(out))
            if on_record is not None:
                on_record(spec, done[spec])
        return done
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=min(jobs, len(order)), mp_context=ctx)
    try:
        futures = {pool.submit(run_one, values, (s.batch_size, s.lr_index), str(out)): s for s in order}
        for future in cf.as_completed(futures):
            spec = futures[future]
            done[spec] = future.result()
            if on_record is not None:
                on_record(spec, done[spec])
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return done
