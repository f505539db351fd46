"""Batch-size sweeps of the built-in tasks: steps and examples to each goal, and B_crit.

For a geometric grid of batch sizes ``B`` (in the task's unit: images or examples) a sweep
trains the task with plain SGD (no momentum, the optimizer of the paper's analysis) at a few
learning rates per batch size, centred on the rule of McCandlish et al. (2018), appendix A.3,

.. math::

    \\epsilon(B) = \\frac{\\epsilon_{max}}{(1 + B_*/B)^{\\alpha}}

(``alpha = 1`` for SGD, eq. 2.6), on a geometric grid ``epsilon(B) * step^i``. When the best
learning rate of a batch size sits on the edge of its grid and beats its neighbour, the grid
is widened by one point on that side and the new run is trained, up to ``max_widenings`` times
per batch size. The best run of a batch size is the one that reached the most goals, and of
those the one that reached its last goal in the fewest steps.

Each run trains until it has reached every goal (training-loss levels on a fixed subset of
the training set, test-error levels on a fixed subset of the test set), its loss diverges or
stalls, or its step budget (``max_examples / B`` steps within ``[min_steps, max_steps]``) is
spent. The goals are checked on a
geometric schedule of steps (every ``eval_growth - 1`` of the steps done, e.g. 10%); the
steps to a goal are interpolated linearly between the two checks around the crossing and
rounded up. A goal a run never reached is *censored* at the run's last step. The meter of
:mod:`noisescale.meter` (per-example norms) runs in the same runs; the run-averaged
B_simple to a goal is the mean, over the steps up to it, of the meter's smoothed B_simple
(McCandlish et al. 2018, appendix D: B_crit is an average of B_noise over the steps, so the
ratio is averaged, not its parts; the ratio of the step-averaged ``tr(Sigma)`` and ``|G|^2`` is
kept too, as ``b_simple_ratio``).

A sweep directory is self-describing and resumable::

    config.json             the SweepConfig (refused if a re-run asks for another one)
    runs/<B>_<lr>.json      one record per finished run, each written atomically
    results.csv             goal, batch_size, steps, reached, run, lr, b_simple, metric
    fit.json                the fit per goal (noisescale.critical) and B_simple next to it
    pareto.png, b_crit.png  training-loss goals; *_test_error.png for the test-error goals

A run is identified by its batch size and learning rate; re-running the sweep skips every run
that has a record and redoes the others (an interrupted run leaves no record). Runs are
deterministic given the seed (one torch thread each), so a resumed sweep ends with the same
``results.csv`` as an uninterrupted one, whatever the number of parallel jobs.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    eqs. (2.6), (2.11)-(2.12), appendix A.2-A.3, D and Table 1.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

import noisescale
from noisescale.critical import CriticalBatchFit, check_fit_settings
from noisescale.errors import SweepConfigError, SweepDataError
from noisescale.io import atomic_write_text, write_json
from noisescale.predict import BCritPowerLaw, fit_b_crit_power_law
from noisescale.sweepdata import GoalFit, b_simple_by_goal, fit_sweep
from noisescale.tasks import CLASSIFICATION_TASKS, Task, get_task
from noisescale.training import TrainConfig, Trainer, normalize_method

__all__ = [
    "METRICS",
    "SWEEP_METHODS",
    "SWEEP_TASKS",
    "Goal",
    "RunSpec",
    "SweepConfig",
    "SweepConfigError",
    "best_lr_index",
    "execute_runs",
    "load_records",
    "lr_rule",
    "plan_widening",
    "prepare_sweep_dir",
    "results_table",
    "run_one",
    "train_run",
]

SWEEP_FORMAT = 1  # version of config.json and of the run records
METRICS = ("train_loss", "test_error")
_GOAL_LABELS = {"train_loss": "training loss", "test_error": "test error, fraction"}  # plot axes
SWEEP_METHODS = ("per_example", "microbatch")  # estimators of a run in one process (no ddp)
_MAX_SEED = 2**63  # seeds are in [0, 2**63)
_SUBSET_SEED = 0  # seed of the fixed evaluation subsets, the same for every run
_DIVERGED = 3.0  # a training loss above this many times the initial one counts as diverged
# A run is "stalled" when its loss is still above _STALL_LOSS times the initial one after
# _STALL_FRACTION of its budget and at least _STALL_MIN_STEPS steps (a conv net may sit on a
# plateau for its first tens of steps).
_STALL_LOSS = 0.9
_STALL_FRACTION = 0.05
_STALL_MIN_STEPS = 100


def lr_rule(batch_size: float, lr_max: float, b_star: float, alpha: float = 1.0) -> float:
    """Centre of the learning-rate grid at a batch size.

    .. math::

        \\epsilon(B) = \\epsilon_{max} / (1 + B_*/B)^{\\alpha}

    Args:
        batch_size: B, examples per step.
        lr_max: ``epsilon_max``, the learning rate at very large batches.
        b_star: ``B_*``, examples; below it the rule grows about linearly in B.
        alpha: 1 for SGD (eq. 2.6); about 0.5 for Adam (appendix E).

    Returns:
        The learning rate.

    Example:
        >>> lr_rule(100, 1.0, 100)
        0.5

    References:
        McCandlish et al. (2018), arXiv:1812.06162, eq. (2.6) and appendix A.3.
    """
    return lr_max / (1.0 + b_star / batch_size) ** alpha


class Goal(NamedTuple):
    """One target of a sweep: a level of a metric, reached when the metric is at or below it."""

    metric: str  # "train_loss" (on a fixed training subset) or "test_error" (fraction)
    level: float


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Everything that determines a sweep's runs (saved as ``config.json``).

    Attributes:
        task: built-in task name (:func:`noisescale.tasks.get_task`).
        batch_sizes: the grid, examples per step (geometric by default).
        lr_max: ``epsilon_max`` of the learning-rate rule.
        lr_b_star: ``B_*`` of the rule, examples.
        lr_alpha: exponent of the rule (1: SGD).
        lr_step: ratio between neighbouring learning rates of a batch size's grid.
        lr_points: learning rates per batch size before widening (centred on the rule).
        max_widenings: extra learning rates per batch size at most.
        loss_goals: training-loss levels (mean loss per example on ``eval_examples`` training examples).
        error_goals: test-error levels (fraction misclassified on ``eval_test_examples`` test examples).
        max_steps: largest step budget of a run.
        max_examples: example budget of a run: the step budget is ``max_examples / B`` clipped to
            ``[min_steps, max_steps]``, so small batches get many steps and large ones few.
        min_steps: smallest step budget of a run (large batches still need ``S_min`` steps).
        eval_examples: training examples in the fixed subset the loss goals are checked on.
        eval_test_examples: test examples in the fixed subset the error goals are checked on.
        eval_growth: goals are checked at steps growing by this factor (at least one step apart).
        method: the meter's estimator, ``"per_example"`` or ``"microbatch"``.
        microbatches: micro-batches per step (1 for per_example; >= 2 for microbatch).
        ema_examples: time constant of the meter's averages, examples.
        momentum: SGD momentum (0: plain SGD).
        seed: initial weights and data stream of every run.
        format: version of the sweep directory layout.
    """

    task: str
    batch_sizes: tuple[int, ...]
    lr_max: float
    lr_b_star: float
    lr_alpha: float = 1.0
    lr_step: float = 2.0
    lr_points: int = 3
    max_widenings: int = 2
    loss_goals: tuple[float, ...] = ()
    error_goals: tuple[float, ...] = ()
    max_steps: int = 10_000
    max_examples: int = 1_000_000
    min_steps: int = 1000
    eval_examples: int = 2048
    eval_test_examples: int = 2048
    eval_growth: float = 1.1
    method: str = "per_example"
    microbatches: int = 1
    ema_examples: float = 10_000.0
    momentum: float = 0.0
    seed: int = 0
    format: int = SWEEP_FORMAT

    def __post_init__(self) -> None:
        """Normalise the sequences and validate every field; the messages say what to change."""
        sizes = tuple(sorted({int(b) for b in self.batch_sizes}))
        object.__setattr__(self, "batch_sizes", sizes)
        object.__setattr__(
            self, "loss_goals", tuple(sorted({float(g) for g in self.loss_goals}, reverse=True))
        )
        object.__setattr__(
            self, "error_goals", tuple(sorted({float(g) for g in self.error_goals}, reverse=True))
        )
        try:
            object.__setattr__(self, "method", normalize_method(self.method))
        except ValueError as exc:
            raise SweepConfigError(str(exc)) from None
        # Comparisons are written so that NaN fails them.
        if len(sizes) < 3 or sizes[0] < 2:
            raise SweepConfigError(f"expected at least 3 batch sizes >= 2 but got {list(sizes)}")
        if not self.loss_goals and not self.error_goals:
            raise SweepConfigError("a sweep needs at least one goal: give a loss goal or an error goal")
        if not all(0 < g < math.inf for g in self.loss_goals):
            raise SweepConfigError(f"loss goals must be positive and finite, got {list(self.loss_goals)}")
        if set(self.loss_goals) & set(self.error_goals):
            raise SweepConfigError("a loss goal and an error goal have the same value: make them differ")
        if not all(0 < g < 1 for g in self.error_goals):
            raise SweepConfigError(f"error goals are fractions in (0, 1), got {list(self.error_goals)}")
        if self.error_goals and self.task not in CLASSIFICATION_TASKS:
            raise SweepConfigError(
                f"task {self.task!r} is not a classification task, so it has no test error: "
                "give loss goals only"
            )
        if not (
            0 < self.lr_max < math.inf
            and 0 <= self.lr_b_star < math.inf
            and 0 <= self.lr_alpha < math.inf
            and 1 < self.lr_step < math.inf
            and self.lr_points >= 1
        ):
            raise SweepConfigError(
                "expected finite lr_max > 0, lr_b_star >= 0, lr_alpha >= 0, lr_step > 1 and lr_points >= 1"
            )
        if min(self.min_steps, self.max_examples, self.eval_examples, self.eval_test_examples) < 1:
            raise SweepConfigError("budgets and evaluation subsets must be at least 1")
        if self.min_steps > self.max_steps:
            raise SweepConfigError(
                f"expected min_steps <= max_steps but got {self.min_steps} > {self.max_steps}"
            )
        if sizes[-1] > self.max_examples:
            raise SweepConfigError(
                f"batch size {sizes[-1]} is above the example budget of a run, max_examples="
                f"{self.max_examples}: drop it or raise max_examples"
            )
        if not (
            1 < self.eval_growth < math.inf and 0 < self.ema_examples < math.inf and self.max_widenings >= 0
        ):
            raise SweepConfigError(
                "expected finite eval_growth > 1, max_widenings >= 0 and finite ema_examples > 0"
            )
        if self.method not in SWEEP_METHODS:
            raise SweepConfigError(
                f"a sweep trains each run in one process: expected method 'per-example' or 'microbatch' "
                f"but got {self.method!r}"
            )
        if not 0 <= self.seed < _MAX_SEED:
            raise SweepConfigError(f"expected 0 <= seed < 2**63 but got {self.seed}")
        if self.microbatches >= 1 and any(b % self.microbatches for b in sizes):
            raise SweepConfigError(f"every batch size must be a multiple of microbatches={self.microbatches}")
        for b in sizes:  # the checks of a single run (micro-batches, momentum...), before any training
            try:
                self.train_config(b, self.learning_rate(b, 0))
            except ValueError as exc:
                raise SweepConfigError(str(exc)) from None

    @property
    def goals(self) -> list[Goal]:
        """Loss goals (highest first), then error goals (highest first): easiest to hardest."""
        return [Goal("train_loss", g) for g in self.loss_goals] + [
            Goal("test_error", g) for g in self.error_goals
        ]

    def budget(self, batch_size: int) -> int:
        """Step budget of a run: ``ceil(max_examples / B)`` clipped to ``[min_steps, max_steps]``."""
        return max(self.min_steps, min(self.max_steps, math.ceil(self.max_examples / batch_size)))

    def base_lr_indices(self) -> range:
        """Indices of the initial learning-rate grid, centred on 0 (the rule's value)."""
        return range(-(self.lr_points // 2), self.lr_points - self.lr_points // 2)

    def learning_rate(self, batch_size: int, index: int) -> float:
        """Learning rate ``epsilon(B) * lr_step**index`` (see :func:`lr_rule`)."""
        center = lr_rule(batch_size, self.lr_max, self.lr_b_star, self.lr_alpha)
        return float(f"{center * self.lr_step**index:.6g}")  # 6 digits: stable file names and JSON

    def train_config(self, batch_size: int, lr: float) -> TrainConfig:
        """The settings of the run at ``batch_size`` and ``lr``, with its step budget.

        Raises:
            ValueError: if they make no valid run (e.g. the microbatch method with one micro-batch).
        """
        budget = self.budget(batch_size)
        return TrainConfig(
            batch_size=batch_size,
            microbatches=self.microbatches,
            lr=lr,
            steps=budget,
            method=self.method,
            seed=self.seed,
            momentum=self.momentum,
            ema_decay=None,
            ema_examples=self.ema_examples,
            measure_every=budget + 1,  # estimates are read at the checks only (one host sync each)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (sequences as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SweepConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            SweepConfigError: on unknown keys or invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise SweepConfigError(
                f"unknown sweep settings {sorted(unknown)}: expected some of {sorted(names)}"
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> SweepConfig:
        """The defaults of a built-in task, with every override that is not None applied.

        Raises:
            SweepConfigError: for a task without sweep defaults, an unknown setting or an invalid value.
        """
        if task not in SWEEP_TASKS:
            raise SweepConfigError(
                f"no sweep defaults for task {task!r}: expected one of {', '.join(SWEEP_TASKS)}"
            )
        values = {**_DEFAULTS[task], **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict({"task": task, **values})


def _grid(low: int, high: int, factor: int = 2) -> list[int]:
    """Geometric grid ``low, low*factor, ...`` up to ``high``."""
    out = [low]
    while out[-1] * factor <= high:
        out.append(out[-1] * factor)
    return out


# Defaults per task (the reasoning and the measured cost are in docs/sweeps.md).
_DEFAULTS: dict[str, dict[str, Any]] = {
    # MLP 784-256-256-10. Pilot runs (plain SGD, seed 0): the fastest learning rate to a
    # training loss of 0.1 was about 0.4-0.5 at B = 64 and 1.0 at B = 1024 (2.0 diverges),
    # hence lr_max = 1 and B_* = 64. B_crit is about 130 images at that goal.
    "mnist": {
        "batch_sizes": _grid(16, 2048, 2),
        "lr_max": 1.0,
        "lr_b_star": 64.0,
        "loss_goals": [0.4, 0.2, 0.1],
        "error_goals": [0.05],
        "max_steps": 10_000,
        "max_examples": 600_000,
        "min_steps": 1000,
        "eval_test_examples": 4096,
    },
    # Conv net of tasks.py (slow on a CPU: about 1,000 images/s). Pilot runs (plain SGD, seed 0):
    # the fastest learning rate was about 0.2 at B = 32 and 0.4 at B = 256, and twice that left
    # every unit dead (so did 0.42 at B = 256 in a first sweep: the edge of stability is
    # abrupt), hence a centre a little lower, lr_max = 0.35 and B_* = 32. B_crit was 30-60
    # images at these goals in the pilot runs.
    "fashion-mnist": {
        "batch_sizes": _grid(8, 256, 2),
        "lr_max": 0.35,
        "lr_b_star": 32.0,
        "loss_goals": [0.8, 0.6, 0.5],
        "error_goals": [0.2],
        "max_steps": 3000,
        "max_examples": 100_000,
        "min_steps": 300,
        "eval_examples": 1024,
        "eval_test_examples": 1024,
        "eval_growth": 1.2,
        "ema_examples": 5000.0,
    },
    "digits": {
        "batch_sizes": _grid(8, 512, 4),
        "lr_max": 0.8,
        "lr_b_star": 64.0,
        "loss_goals": [0.5, 0.2],
        "error_goals": [0.1],
        "max_steps": 2000,
        "max_examples": 200_000,
        "min_steps": 200,
        "eval_examples": 1438,
        "eval_test_examples": 359,
        "ema_examples": 2000.0,
    },
    # Noisy linear regression: the loss floor is sigma^2/2 = 0.245 (SCIENCE.md oracle).
    "linreg": {
        "batch_sizes": _grid(2, 128, 4),
        "lr_max": 0.3,
        "lr_b_star": 8.0,
        "loss_goals": [0.6, 0.35],
        "max_steps": 1000,
        "max_examples": 20_000,
        "min_steps": 50,
        "ema_examples": 500.0,
    },
}


SWEEP_TASKS: tuple[str, ...] = tuple(_DEFAULTS)


class RunSpec(NamedTuple):
    """One run of a sweep: a batch size and a learning rate of its grid."""

    batch_size: int  # examples per step
    lr_index: int  # the learning rate is epsilon(B) * lr_step**lr_index

    def lr(self, config: SweepConfig) -> float:
        """The run's learning rate."""
        return config.learning_rate(self.batch_size, self.lr_index)

    def name(self, config: SweepConfig) -> str:
        """File stem of the run's record, ``<B>_<lr>``."""
        return f"{self.batch_size}_{self.lr(config):.6g}"


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


class _Probe:
    """Fixed evaluation subsets of a task: training loss and test error of a model on them."""

    def __init__(self, task: Task, config: SweepConfig) -> None:
        gen = torch.Generator().manual_seed(_SUBSET_SEED)
        if task.x_train is None or task.y_train is None:
            self.x, self.y = task.sample_batch(config.eval_examples, gen)
        else:
            idx = torch.randperm(len(task.x_train), generator=gen)[: config.eval_examples]
            self.x, self.y = task.x_train[idx], task.y_train[idx]
        idx = torch.randperm(len(task.x_test), generator=gen)[: config.eval_test_examples]
        self.x_test, self.y_test = task.x_test[idx], task.y_test[idx]
        self.task = task

    @torch.no_grad()
    def __call__(self, model: nn.Module, *, loss: bool, error: bool) -> tuple[float | None, float | None]:
        """``(train_loss, test_error)``; each None when not asked for (or not a classification task)."""
        device = next(model.parameters()).device
        train_loss = float(self.task.loss_fn(model(self.x.to(device)), self.y.to(device))) if loss else None
        test_error = None
        if error and self.task.classification:
            wrong = model(self.x_test.to(device)).argmax(-1) != self.y_test.to(device)
            test_error = float(wrong.float().mean())
        return train_loss, test_error


def _crossing(curve: Sequence[dict[str, Any]], metric: str, level: float) -> float | None:
    """First step at which ``metric`` falls to ``level``, interpolated between checks; None if never."""
    prev = None
    for point in curve:
        value = point[metric]
        if value is None:
            continue
        if value <= level:
            if prev is None or prev[1] <= value:
                return float(point["step"])
            s0, v0 = prev
            return s0 + (point["step"] - s0) * (v0 - level) / (v0 - value)
        prev = (point["step"], value)
    return None


def _run_average(curve: Sequence[dict[str, Any]], upto: float) -> tuple[float | None, float | None]:
    """Step-weighted run averages to step ``upto``: mean smoothed B_simple, and the ratio of means.

    Each check carries the meter's smoothed estimate; it stands for the steps since the previous
    check. Checks whose B_simple is not resolved are left out of the mean of the ratio.
    """
    num = den = ratio_sum = weight = 0.0
    prev = 0
    for point in curve:
        if point["step"] == 0:
            continue
        span = min(point["step"], upto) - prev
        if span <= 0:
            break
        prev = point["step"]
        if point.get("trace_sigma") is not None and point.get("grad_norm_sq") is not None:
            num += span * point["trace_sigma"]
            den += span * point["grad_norm_sq"]
        if point.get("b_simple") is not None:
            ratio_sum += span * point["b_simple"]
            weight += span
    mean = ratio_sum / weight if weight > 0 else None
    return mean, (num / den if den > 0 else None)


def train_run(task: Task, config: SweepConfig, spec: RunSpec) -> dict[str, Any]:
    """Train one run of the sweep until it reaches every goal, diverges or spends its budget.

    Args:
        task: the task named by ``config.task``.
        config: the sweep.
        spec: batch size and learning-rate index of the run.

    Returns:
        The run record (JSON-ready): ``batch_size``, ``lr``, ``seed``, ``steps_budget``,
        ``steps_run``, ``stopped`` ("goals", "budget", "diverged" or "stalled"), ``goals`` (per goal:
        ``steps`` and ``examples`` to it, or None when censored at ``steps_run``, and the
        run-averaged ``b_simple`` to it), ``b_simple`` over the whole run, ``curve`` (the checks)
        and ``wall_time_s``.
    """
    start = time.perf_counter()
    train_config = config.train_config(spec.batch_size, spec.lr(config))
    budget = train_config.steps
    probe = _Probe(task, config)
    goals = config.goals
    done = [False] * len(goals)
    curve: list[dict[str, Any]] = []
    stopped, next_check, initial_loss = "budget", 0, None
    with Trainer(task, train_config) as trainer:
        for step in range(budget + 1):
            if step:
                trainer.step()
            if step < next_check and step < budget:
                continue
            next_check = max(step + 1, math.ceil(step * config.eval_growth))
            point = _check(trainer, probe, step, goals, done)
            curve.append(point)
            initial_loss = point["train_loss"] if initial_loss is None else initial_loss
            verdict = _hopeless(
                point["train_loss"],
                initial_loss,
                late=step >= max(budget * _STALL_FRACTION, _STALL_MIN_STEPS),
            )
            if verdict is not None:
                stopped = verdict
                break
            if all(done):
                stopped = "goals"
                break
    return _record(config, spec, task.unit, budget, curve, stopped, time.perf_counter() - start)


def _check(trainer: Trainer, probe: _Probe, step: int, goals: list[Goal], done: list[bool]) -> dict[str, Any]:
    """Evaluate the metrics still needed and the meter at one check; marks the goals reached."""
    need = {g.metric for g, d in zip(goals, done, strict=True) if not d}
    loss, error = probe(trainer.model, loss="train_loss" in need or step == 0, error="test_error" in need)
    point: dict[str, Any] = {"step": step, "train_loss": loss, "test_error": error}
    est = trainer.estimate() if step else None
    if est is not None and est.steps:
        point.update(
            b_simple=est.b_simple if est.resolved else None,
            grad_norm_sq=est.grad_norm_sq,
            trace_sigma=est.trace_sigma,
        )
    for i, g in enumerate(goals):
        value = point[g.metric]
        done[i] = done[i] or (value is not None and step > 0 and value <= g.level)
    return point


def _hopeless(loss: float | None, initial: float | None, *, late: bool) -> str | None:
    """Why a run cannot be the fastest to any goal, or None.

    ``"diverged"``: a non-finite loss or one above ``_DIVERGED`` times the initial loss.
    ``"stalled"``: still above 90% of the initial loss after 5% of the budget and at least 100
    steps (``late``), e.g. a network whose units all died at a too large learning rate (its
    loss stays at log(classes)).
    """
    if loss is None or initial is None:
        return None
    if not math.isfinite(loss) or loss > _DIVERGED * initial:
        return "diverged"
    return "stalled" if late and loss > _STALL_LOSS * initial else None


def _record(
    config: SweepConfig,
    spec: RunSpec,
    unit: str,
    budget: int,
    curve: list[dict[str, Any]],
    stopped: str,
    wall: float,
) -> dict[str, Any]:
    """The JSON record of a finished run (see :func:`train_run`)."""
    steps_run = curve[-1]["step"]
    per_goal = []
    for g in config.goals:
        crossing = _crossing(curve, g.metric, g.level)
        steps = None if crossing is None else max(1, math.ceil(crossing - 1e-9))
        mean, ratio = _run_average(curve, steps if steps is not None else steps_run)
        per_goal.append(
            {
                "metric": g.metric,
                "goal": g.level,
                "reached": steps is not None,
                "steps": steps,
                "examples": None if steps is None else steps * spec.batch_size,
                "b_simple": mean,
                "b_simple_ratio": ratio,
            }
        )
    mean, ratio = _run_average(curve, steps_run)
    return {
        "format": SWEEP_FORMAT,
        "name": spec.name(config),
        "batch_size": spec.batch_size,
        "lr": spec.lr(config),
        "lr_index": spec.lr_index,
        "seed": config.seed,
        "unit": unit,
        "steps_budget": budget,
        "steps_run": steps_run,
        "examples_run": steps_run * spec.batch_size,
        "stopped": stopped,
        "goals": per_goal,
        "b_simple": mean,
        "b_simple_ratio": ratio,
        "final_train_loss": next(
            (p["train_loss"] for p in reversed(curve) if p["train_loss"] is not None), None
        ),
        "curve": curve,
        "wall_time_s": wall,
        "noisescale_version": noisescale.__version__,
    }


@lru_cache(maxsize=2)
def _cached_task(name: str) -> Task:
    """The task, loaded once per process (a worker trains many runs of it)."""
    return get_task(name)


def run_one(config_values: dict[str, Any], spec: tuple[int, int], out: str) -> dict[str, Any]:
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
        record = train_run(_cached_task(config.task), config, run)
    finally:
        torch.set_num_threads(threads)
    write_json(Path(out) / "runs" / f"{run.name(config)}.json", record)
    return record


# ---------------------------------------------------------------------------------------------
# The sweep directory
# ---------------------------------------------------------------------------------------------


def prepare_sweep_dir(out: str | Path, config: SweepConfig) -> bool:
    """Create the sweep directory with its ``config.json``, or check that it holds this sweep.

    Stale temporary files of writes that were killed are removed.

    Args:
        out: the sweep directory.
        config: the sweep to run there.

    Returns:
        True when resuming a sweep (``config.json`` was already there).

    Raises:
        SweepConfigError: if ``out`` cannot be a directory (e.g. it is a file) or is not
            writable, or ``config.json`` describes another sweep (the message lists the settings
            that differ) or cannot be read.
    """
    out = Path(out)
    path = out / "config.json"
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        for stale in (out / "runs").glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        if not path.exists():
            write_json(path, {**config.to_dict(), "noisescale_version": noisescale.__version__})
            return False
    except OSError as exc:
        what = "is a file, not a directory" if out.is_file() else f"cannot hold the sweep ({exc.strerror})"
        raise SweepConfigError(f"{out} {what}: choose another --out directory") from None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SweepConfigError(f"{path}: cannot read the saved sweep configuration ({exc})") from exc
    saved.pop("noisescale_version", None)
    mine = json.loads(json.dumps(config.to_dict()))
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if diff:
        shown = "; ".join(f"{k}: saved {saved.get(k)!r}, asked {mine.get(k)!r}" for k in diff[:6])
        raise SweepConfigError(
            f"{out} holds another sweep ({shown}). Re-run with the saved settings to resume it, "
            "or choose another --out directory"
        )
    return True


def load_records(out: str | Path, config: SweepConfig) -> dict[RunSpec, dict[str, Any]]:
    """The finished runs of a sweep directory, by run.

    A record that cannot be read (not expected: records are written atomically) or that belongs
    to no run of this configuration is ignored, so its run is redone.
    """
    records: dict[RunSpec, dict[str, Any]] = {}
    for path in sorted(Path(out, "runs").glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            spec = RunSpec(int(record["batch_size"]), int(record["lr_index"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if spec.batch_size in config.batch_sizes and path.stem == spec.name(config):
            records[spec] = record
    return records


def _score(record: dict[str, Any]) -> tuple[int, float]:
    """Goals reached (more is better) and the steps to the last of them (fewer is better)."""
    reached = [g["steps"] for g in record["goals"] if g["reached"]]
    if reached:
        return len(reached), -float(max(reached))
    loss = record.get("final_train_loss")
    bad = record["stopped"] == "diverged" or loss is None or not math.isfinite(loss)
    return 0, -math.inf if bad else -float(loss)  # no goal reached: the lowest final loss


def best_lr_index(records: dict[RunSpec, dict[str, Any]], batch_size: int) -> int | None:
    """The learning-rate index of the best run at ``batch_size`` (None: no run there).

    Best: most goals reached, then fewest steps to the last of them; with no goal reached,
    the lowest final training loss of the runs that did not diverge. Ties go to the index
    nearest the rule's value, so a tie with an edge does not widen the grid.
    """
    runs = {s.lr_index: r for s, r in records.items() if s.batch_size == batch_size}
    if not runs:
        return None
    return max(runs, key=lambda i: (*_score(runs[i]), -abs(i)))


def plan_widening(config: SweepConfig, records: dict[RunSpec, dict[str, Any]]) -> list[RunSpec]:
    """Runs that widen the learning-rate grid of each batch size whose best value is on its edge.

    Args:
        config: the sweep.
        records: the finished runs.

    Returns:
        At most one new run per batch size, one grid step beyond the edge holding the best run
        (when it beats its neighbour), while the batch size has fewer than ``max_widenings``
        extra learning rates.
    """
    base = len(config.base_lr_indices())
    plan = []
    for b in config.batch_sizes:
        runs = {s.lr_index: r for s, r in records.items() if s.batch_size == b}
        have = sorted(runs)
        if len(have) < 2 or len(have) >= base + config.max_widenings:
            continue
        best = best_lr_index(records, b)
        # Widen only when the edge beats its neighbour: a tie puts the optimum inside the grid.
        for edge, inner, step in ((have[0], have[1], -1), (have[-1], have[-2], 1)):
            if best == edge and _score(runs[edge]) > _score(runs[inner]):
                plan.append(RunSpec(b, edge + step))
    return plan


def execute_runs(
    config: SweepConfig,
    specs: Sequence[RunSpec],
    out: str | Path,
    *,
    jobs: int = 1,
    on_record: Callable[[RunSpec, dict[str, Any]], None] | None = None,
) -> dict[RunSpec, dict[str, Any]]:
    """Train ``specs`` (largest batch sizes first), ``jobs`` at a time, each writing its record.

    With ``jobs > 1`` the runs go to a pool of spawned processes with one torch thread each;
    with ``jobs == 1`` they run in this process, also with one thread (the same results).

    Args:
        config: the sweep.
        specs: runs to train.
        out: the sweep directory.
        jobs: parallel processes.
        on_record: called in this process with every finished run (progress, tests).

    Returns:
        The records of the runs trained.
    """
    order = sorted(specs, key=lambda s: (-s.batch_size, s.lr_index))
    values, done = config.to_dict(), {}
    if jobs <= 1 or len(order) <= 1:
        for spec in order:
            done[spec] = run_one(values, tuple(spec), str(out))
            if on_record is not None:
                on_record(spec, done[spec])
        return done
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=min(jobs, len(order)), mp_context=ctx)
    try:
        futures = {pool.submit(run_one, values, tuple(s), str(out)): s for s in order}
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


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def results_table(config: SweepConfig, records: dict[RunSpec, dict[str, Any]]) -> pd.DataFrame:
    """The sweep as one row per (goal, batch size): the fastest run reaching the goal.

    Where no run of a batch size reached a goal, the row is censored at the fewest steps run
    by the runs that spent their whole budget (the best-tuned run would need more), else by the
    runs that did not diverge, else by all of them.

    Returns:
        The table of :func:`noisescale.sweepdata.load_sweep` (``goal, batch_size, steps,
        reached, run, lr, b_simple``) plus ``metric``, in goal order then batch size.
    """
    rows = []
    for k, goal in enumerate(config.goals):
        for b in config.batch_sizes:
            runs = [r for s, r in sorted(records.items()) if s.batch_size == b]
            if not runs:
                continue
            hit = [r for r in runs if r["goals"][k]["reached"]]
            if hit:
                best = min(hit, key=lambda r: (r["goals"][k]["steps"], abs(r["lr_index"])))
                steps, reached = best["goals"][k]["steps"], True
            else:
                full = [r for r in runs if r["stopped"] == "budget"]
                alive = full or [r for r in runs if r["stopped"] != "diverged"] or runs
                best = min(alive, key=lambda r: (r["steps_run"], abs(r["lr_index"])))
                steps, reached = max(1, best["steps_run"]), False
            b_simple = best["goals"][k]["b_simple"]
            rows.append(
                {
                    "goal": goal.level,
                    "batch_size": b,
                    "steps": steps,
                    "reached": reached,
                    "run": best["name"],
                    "lr": best["lr"],
                    "b_simple": np.nan if b_simple is None else b_simple,
                    "metric": goal.metric,
                }
            )
    columns = ["goal", "batch_size", "steps", "reached", "run", "lr", "b_simple", "metric"]
    return pd.DataFrame(rows, columns=columns)


def missing_runs(config: SweepConfig, records: Iterable[RunSpec]) -> list[RunSpec]:
    """Runs of the initial learning-rate grids that have no record yet."""
    have = set(records)
    grid = (RunSpec(b, i) for b in config.batch_sizes for i in config.base_lr_indices())
    return [s for s in grid if s not in have]


def plan_next(config: SweepConfig, records: dict[RunSpec, dict[str, Any]]) -> list[RunSpec]:
    """The runs to train next: the initial grid's missing runs, else the next widening round.

    A pure function of the finished records, so an interrupted sweep resumes into the same plan.
    """
    return missing_runs(config, records) or plan_widening(config, records)


class SweepResult(NamedTuple):
    """What :func:`run_sweep` and :func:`write_results` return."""

    config: SweepConfig
    records: dict[RunSpec, dict[str, Any]]  # every finished run
    table: pd.DataFrame  # results.csv
    fits: list[tuple[str, GoalFit]]  # (metric, fit) per goal, in goal order
    b_simple: dict[float | None, tuple[float, float, float]]  # goal -> (median, min, max), examples
    unit: str  # what a batch size counts
    files: list[Path]  # results.csv, fit.json and the plots
    trained: int  # runs trained by this call (0: everything was there)


def run_sweep(
    config: SweepConfig,
    out: str | Path,
    *,
    jobs: int = 1,
    on_record: Callable[[RunSpec, dict[str, Any]], None] | None = None,
    on_plan: Callable[[list[RunSpec]], None] | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
) -> SweepResult:
    """Run (or resume) a sweep in ``out``, then fit it and write its results and plots.

    Args:
        config: the sweep.
        out: its directory (created; a directory of another sweep is refused).
        jobs: parallel processes.
        on_record: called with every run finished by this call.
        on_plan: called with the runs of every round before they start (the initial grid,
            then each widening round).
        n_bootstrap: bootstrap resamples of the fit's intervals.
        confidence: level of the intervals and bounds.

    Returns:
        The records, the table, the fit per goal and the files written.

    Raises:
        SweepConfigError: before any training, if ``n_bootstrap`` or ``confidence`` is invalid
            (see :func:`noisescale.critical.check_fit_settings`) or ``out`` cannot hold this sweep.
    """
    try:
        check_fit_settings(n_bootstrap=n_bootstrap, confidence=confidence)
    except ValueError as exc:
        raise SweepConfigError(str(exc)) from None
    prepare_sweep_dir(out, config)
    records = load_records(out, config)
    trained = 0
    while todo := plan_next(config, records):
        if on_plan is not None:
            on_plan(todo)
        new = execute_runs(config, todo, out, jobs=jobs, on_record=on_record)
        records.update(new)
        trained += len(new)
    result = write_results(config, out, records, n_bootstrap=n_bootstrap, confidence=confidence)
    return result._replace(trained=trained)


def write_results(
    config: SweepConfig,
    out: str | Path,
    records: dict[RunSpec, dict[str, Any]],
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
) -> SweepResult:
    """Rebuild ``results.csv``, ``fit.json`` and the plots from the finished runs.

    Each metric gets its own pair of plots: ``pareto.png`` and ``b_crit.png`` for the
    training-loss goals, ``pareto_test_error.png`` and ``b_crit_test_error.png`` for the
    test-error goals.

    Raises:
        SweepDataError: if there is no finished run.
    """
    from noisescale.plotting_critical import plot_b_crit_by_goal, plot_pareto_front

    out = Path(out)
    if not records:
        raise SweepDataError(f"{out}: no finished run yet; run the sweep (re-running it resumes)")
    unit = next(iter(records.values())).get("unit", "examples")
    table = results_table(config, records)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    files, fits = [out / "results.csv"], []
    b_simple = b_simple_by_goal(table)
    for metric in METRICS:
        part = table[table["metric"] == metric].drop(columns="metric").reset_index(drop=True)
        if part.empty:
            continue
        goal_fits = fit_sweep(part, n_bootstrap=n_bootstrap, confidence=confidence)
        fits += [(metric, g) for g in goal_fits]
        suffix = "" if metric == "train_loss" else f"_{metric}"
        files.append(plot_pareto_front(goal_fits, out / f"pareto{suffix}.png", unit=unit))
        law = _power_law(goal_fits) if metric == "train_loss" else None
        files.append(
            plot_b_crit_by_goal(
                goal_fits,
                out / f"b_crit{suffix}.png",
                b_simple=b_simple,
                power_law=law,
                unit=unit,
                goal_label=_GOAL_LABELS[metric],
            )
        )
    result = SweepResult(config, records, table, fits, b_simple, unit, files, 0)
    write_json(out / "fit.json", fit_summary(result))
    return result._replace(files=[*files, out / "fit.json"])


def _power_law(goal_fits: list[GoalFit]) -> BCritPowerLaw | None:
    """``B_crit(L)`` across the bracketed loss goals (Kaplan et al. 2020, eq. 5.3), if it fits."""
    pairs = [(g.goal, g.fit.b_crit) for g in goal_fits if g.fit is not None and g.fit.b_crit and g.goal]
    if len(pairs) < 2:
        return None
    try:
        return fit_b_crit_power_law([p[0] for p in pairs], [p[1] for p in pairs])
    except (SweepDataError, ValueError):
        return None


def goal_ratio(fit: CriticalBatchFit | None, b_simple: tuple[float, float, float] | None) -> float | None:
    """Run-averaged B_simple (median over the batch sizes) divided by B_crit; None unless both exist."""
    if fit is None or fit.b_crit is None or b_simple is None:
        return None
    return b_simple[0] / fit.b_crit


def fit_summary(result: SweepResult) -> dict[str, Any]:
    """The ``fit.json`` object: the configuration and, per goal, the fit next to B_simple."""
    goals = []
    for metric, g in result.fits:
        bs = result.b_simple.get(g.goal)
        entry: dict[str, Any] = {"metric": metric, "goal": g.goal}
        entry.update(g.fit.to_dict() if g.fit is not None else {"error": g.error})
        entry["b_simple"] = None if bs is None else {"median": bs[0], "min": bs[1], "max": bs[2]}
        entry["b_simple_over_b_crit"] = goal_ratio(g.fit, bs)
        goals.append(entry)
    return {
        "unit": result.unit,
        "config": result.config.to_dict(),
        "runs": len(result.records),
        "goals": goals,
        "files": [p.name for p in result.files],
        "noisescale_version": noisescale.__version__,
    }
