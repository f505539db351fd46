"""Train a built-in task with plain SGD while measuring the gradient noise scale.

One optimizer step draws ``B`` examples (:meth:`noisescale.tasks.Task.sample_batch`),
splits them into ``k`` equal micro-batches, back-propagates ``loss_j / k`` for each
(mean loss per micro-batch, divided by ``k``: the gradient is that of the mean loss
over all ``B`` examples), lets the meter read the gradients, then steps::

    for step in range(steps):
        for xb, yb in micro_batches:          # k of B/k examples
            (loss_fn(model(xb), yb) / k).backward()
        meter.update(batch_size=B)            # before any clipping or optimizer.step()
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        estimate = meter.compute()            # every `measure_every` steps

:class:`Trainer` exposes that step for callers with their own loop (a batch-size
sweep that trains to a loss goal); :func:`train` runs it for a number of steps with
an optional per-step callback and stop condition. Runs are deterministic given
``seed`` and the number of torch threads.

The noise scale depends on the temperature ``lr / B`` (McCandlish et al. 2018,
appendix C): every :class:`StepRecord` keeps the learning rate and the batch size.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from noisescale import distributed as nsdist
from noisescale.tasks import Task

__all__ = [
    "METHODS",
    "StepRecord",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "evaluate",
    "make_meter",
    "normalize_method",
    "train",
    "train_loss",
]

METHODS = ("per_example", "microbatch", "ddp")
_TRAIN_SUBSET_SEED = 0  # fixed subset on which train_loss() is computed
_TRAIN_SUBSET_SIZE = 10_000


def normalize_method(method: str) -> str:
    """Canonical method name: ``"per-example"`` and ``"per_example"`` both give ``"per_example"``.

    Raises:
        ValueError: if the method is unknown.
    """
    canonical = method.strip().lower().replace("-", "_")
    if canonical not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected 'per-example' or 'microbatch'")
    return canonical


def make_meter(
    model: nn.Module,
    method: str,
    *,
    ema_decay: float | None,
    ema_examples: float | None,
    confidence: float = 0.95,
) -> Any:
    """The one place that picks and builds the meter for a training run.

    Args:
        model: the model whose gradients are measured.
        method: ``"per_example"`` (per-example norms, one backward per micro-batch) or
            ``"microbatch"`` (k-way estimator over k >= 2 micro-batches).
        ema_decay: per-step decay of the averages, or None when ``ema_examples`` is given.
        ema_examples: averaging time constant in examples, or None.
        confidence: level of the interval of B_simple.

    Returns:
        A :class:`noisescale.GradientNoiseScale` attached to ``model`` (mean reduction per
        micro-batch, micro-batch losses divided by k before backward).
    """
    from noisescale import GradientNoiseScale

    return GradientNoiseScale(
        model,
        method=normalize_method(method),
        reduction="mean",
        accumulation="mean",
        ema_decay=ema_decay,
        ema_examples=ema_examples,
        confidence=confidence,
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run; :meth:`for_task` fills the task's defaults.

    Attributes:
        batch_size: B, examples per optimizer step (in the task's unit).
        microbatches: k, equal micro-batches per step (B divisible by k).
        lr: SGD learning rate (0 keeps the weights fixed: a measurement at one point).
        steps: optimizer steps :func:`train` runs (a stop condition may end it sooner).
        method: ``"per_example"``, ``"microbatch"``, or None to train without measuring.
        seed: initial weights and the data stream.
        momentum: SGD momentum (0: plain SGD, the optimizer of the paper's analysis).
        ema_decay: per-step decay of the meter's averages (1: plain mean), or None.
        ema_examples: averaging time constant in examples, or None (exactly one of the two).
        confidence: level of the interval of B_simple.
        measure_every: compute the estimate every this many steps (a host sync each time;
            under DDP it covers the steps the ranks have exchanged, every ``sync_every``).
        threads: ``torch.set_num_threads`` value, or None to leave it as is.
        device: where the model and the batches live (``"cpu"``, ``"cuda"``...); the data
            is sampled on the CPU (reproducible) and each batch is copied over.
    """

    batch_size: int
    microbatches: int
    lr: float
    steps: int
    method: str | None = "per_example"
    seed: int = 0
    momentum: float = 0.0
    ema_decay: float | None = 0.99
    ema_examples: float | None = None
    confidence: float = 0.95
    measure_every: int = 1
    threads: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        """Validate every field; the messages say what to change."""
        if self.method is not None:
            object.__setattr__(self, "method", normalize_method(self.method))
        for name in ("batch_size", "microbatches", "measure_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"expected `{name}` >= 1 but got {getattr(self, name)}")
        if self.steps < 0 or self.lr < 0 or self.momentum < 0:
            raise ValueError(
                f"expected steps, lr and momentum >= 0 but got {self.steps}, {self.lr}, {self.momentum}"
            )
        if not -(2**63) <= self.seed < 2**64:  # what torch's generators accept
            raise ValueError(f"expected `seed` in [-2**63, 2**64) but got {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"expected `threads` >= 1 but got {self.threads}")
        if self.batch_size % self.microbatches:
            raise ValueError(
                f"batch size {self.batch_size} is not divisible by {self.microbatches} micro-batches: "
                "choose a batch size that is a multiple of the number of micro-batches"
            )
        if self.method == "microbatch" and self.microbatches < 2:
            raise ValueError(
                "the microbatch method needs at least 2 micro-batches per step (use --microbatches 2 or more)"
            )
        if self.method == "per_example" and self.batch_size < 2:
            raise ValueError("the per-example method needs batches of at least 2 examples")
        if (self.ema_decay is None) == (self.ema_examples is None):
            raise ValueError("give exactly one of `ema_decay` (per step) and `ema_examples` (examples)")

    @classmethod
    def for_task(cls, task: Task, **overrides: Any) -> TrainConfig:
        """The task's defaults, with every override that is not None applied.

        ``microbatches`` defaults to 1 for the per-example method and to the task's
        value for the microbatch method; giving ``ema_examples`` turns ``ema_decay`` off.
        ``method`` defaults to ``"per_example"``; an explicit ``method=None`` trains
        without a meter (e.g. a sweep that only needs steps to a goal).

        Raises:
            TypeError: if an override is not a field of TrainConfig.
            ValueError: if the resulting configuration is invalid.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise TypeError(
                f"unknown TrainConfig fields {sorted(unknown)}: expected some of {sorted(fields)}"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        method = given.get("method", "per_example")
        per_example = method is not None and normalize_method(method) == "per_example"
        values: dict[str, Any] = {
            "batch_size": task.batch_size,
            "microbatches": 1 if per_example else task.microbatches,
            "lr": task.lr,
            "steps": task.steps,
            "ema_decay": task.ema_decay,
            "ema_examples": task.ema_examples,
        }
        if "ema_examples" in given:
            values["ema_decay"] = None
        elif "ema_decay" in given:
            values["ema_examples"] = None
        values.update(given)
        if "method" in overrides and overrides["method"] is None:
            values["method"] = None
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one optimizer step did and measured.

    Attributes:
        step: optimizer steps done, counting this one (1-based).
        examples: training examples seen so far, this step included.
        loss: mean training loss of this step's batch, at the weights before the update.
        lr: learning rate of this step.
        batch_size: B, examples in this step.
        wall_time: seconds since the run started.
        estimate: the meter's :class:`~noisescale.meter.NoiseScaleEstimate` after this step,
            or None (no meter, or not a measuring step). Under DDP it covers the steps
            exchanged so far (its ``steps`` says how many): up to ``sync_every - 1`` behind.
    """

    step: int
    examples: int
    loss: float
    lr: float
    batch_size: int
    wall_time: float
    estimate: Any = None

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready record.

        B_simple and its interval are None while the estimate is not resolved (|G|^2 not
        significantly positive): an unresolved ratio is noise, not a value to plot or report.
        """
        est = self.estimate
        out: dict[str, Any] = {
            "step": self.step,
            "examples": self.examples,
            "loss": self.loss,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "wall_time": self.wall_time,
        }
        if est is not None:
            out.update(
                grad_norm_sq=est.grad_norm_sq,
                trace_sigma=est.trace_sigma,
                b_simple=est.b_simple if est.resolved else None,
                b_simple_ci=list(est.b_simple_ci) if est.resolved and est.b_simple_ci is not None else None,
                b_simple_se=est.b_simple_se if est.resolved else None,
                resolved=est.resolved,
            )
        return out


class Trainer:
    """A model, its SGD optimizer, its meter and a seeded data stream, advanced one step at a time.

    Use it as a context manager (or call :meth:`close`) so that the meter's hooks are removed.

    Args:
        task: what to train.
        config: hyperparameters (see :meth:`TrainConfig.for_task`).

    Example:
        >>> from noisescale.tasks import get_task
        >>> task = get_task("linreg")
        >>> cfg = TrainConfig.for_task(task, steps=3, method=None)
        >>> with Trainer(task, cfg) as trainer:
        ...     record = trainer.step()
        >>> record.step, record.examples
        (1, 16)
    """

    def __init__(self, task: Task, config: TrainConfig, *, dist: nsdist.DistInfo | None = None) -> None:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        if dist is not None and config.microbatches % dist.world_size:
            raise ValueError(
                f"{config.microbatches} micro-batches cannot be shared by {dist.world_size} processes: "
                "use a multiple of the number of processes (--microbatches)"
            )
        self.task = task
        self.config = config
        self.dist = dist
        self.model: nn.Module = task.make_model(config.seed).to(config.device)  # same weights on every rank
        self.model.train()
        if dist is not None:
            self.model = nsdist.wrap_ddp(self.model, dist)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum)
        self.meter = (
            None
            if config.method is None
            else make_meter(
                self.model,
                config.method,
                ema_decay=config.ema_decay,
                ema_examples=config.ema_examples,
                confidence=config.confidence,
            )
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.steps_done = 0
        self.examples = 0
        self._start = time.perf_counter()

    def step(self) -> StepRecord:
        """Run one optimizer step (k micro-batches, meter update, SGD step) and measure.

        Returns:
            The step's record; its estimate is set every ``measure_every`` steps.
        """
        cfg, k = self.config, self.config.microbatches
        x, y = self.task.sample_batch(cfg.batch_size, self.generator)
        x, y = x.to(cfg.device, non_blocking=True), y.to(cfg.device, non_blocking=True)
        if self.dist is not None:  # this rank's share: global micro-batches r m .. r m + m - 1
            x, y = nsdist.shard_batch(x, y, rank=self.dist.rank, world_size=self.dist.world_size)
            k //= self.dist.world_size
        loss_sum = torch.zeros((), device=cfg.device)
        micro = list(zip(x.tensor_split(k), y.tensor_split(k), strict=True))  # k equal micro-batches
        for i, (xb, yb) in enumerate(micro):
            with nsdist.grad_sync(self.model, last=i == k - 1):  # DDP: all-reduce on the last only
                loss = self.task.loss_fn(self.model(xb), yb)  # mean over the micro-batch
                (loss / k).backward()
            loss_sum += loss.detach()
        if self.meter is not None:  # before the optimizer changes the gradients; this rank's sizes
            self.meter.update(microbatch_sizes=[len(yb) for _, yb in micro])
        if self.dist is not None:  # the mean loss of the global batch (equal shares)
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= self.dist.world_size
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self.examples += cfg.batch_size
        measuring = self.meter is not None and self.steps_done % cfg.measure_every == 0
        return StepRecord(
            step=self.steps_done,
            examples=self.examples,
            loss=float(loss_sum) / k,
            lr=lr,
            batch_size=cfg.batch_size,
            wall_time=time.perf_counter() - self._start,
            estimate=self.meter.compute() if measuring else None,  # no collective: DDP exchanges every 16
        )

    def estimate(self) -> Any:
        """The meter's estimate of every step so far (None without a meter).

        Under DDP a collective (:meth:`~noisescale.meter.GradientNoiseScale.sync`): call it
        on every rank.
        """
        if self.meter is None:
            return None
        self.meter.sync()
        return self.meter.compute()

    def close(self) -> None:
        """Detach the meter's hooks from the model."""
        if self.meter is not None:
            self.meter.remove()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        model: the trained model (meter hooks removed).
        config: the configuration that ran.
        records: one record per step.
        estimate: the meter's final estimate, or None without a meter.
        wall_time: seconds the training loop took.
        stopped: whether the stop condition ended the run before ``config.steps``.
    """

    model: nn.Module
    config: TrainConfig
    records: list[StepRecord]
    estimate: Any
    wall_time: float
    stopped: bool


def train(
    task: Task,
    config: TrainConfig,
    *,
    callback: Callable[[StepRecord], None] | None = None,
    stop: Callable[[StepRecord, Trainer], bool] | None = None,
    dist: nsdist.DistInfo | None = None,
) -> TrainResult:
    """Train ``task`` for ``config.steps`` steps, or until ``stop`` returns True.

    Args:
        task: what to train.
        config: hyperparameters.
        callback: called with every step's record (progress bars, logging).
        stop: ``stop(record, trainer)`` after every step; True ends the run (e.g. a loss goal
            checked with :func:`evaluate` on ``trainer.model``).

    Returns:
        The model, the records and the final estimate.
    """
    records: list[StepRecord] = []
    stopped = False
    start = time.perf_counter()
    with Trainer(task, config, dist=dist) as trainer:
        for _ in range(config.steps):
            record = trainer.step()
            records.append(record)
            if callback is not None:
                callback(record)
            if stop is not None and stop(record, trainer):
                stopped = True
                break
        estimate = trainer.estimate()  # every step (under DDP a collective, on every rank)
        model = nsdist.unwrap_model(trainer.model)  # rank 0 alone may evaluate it: no DDP collectives
    return TrainResult(model, config, records, estimate, time.perf_counter() - start, stopped)


@torch.no_grad()
def _mean_loss_and_error(
    task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, float | None]:
    """Mean loss and error fraction of ``model`` over ``(x, y)``, in chunks of ``batch_size``."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    loss_total, wrong = 0.0, 0
    try:
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            loss_total += float(task.loss_fn(out, yb)) * len(yb)
            if task.classification:
                wrong += int((out.argmax(-1) != yb).sum())
    finally:
        model.train(was_training)
    n = len(y)
    return loss_total / n, (wrong / n if task.classification else None)


def evaluate(task: Task, model: nn.Module, *, batch_size: int = 2048) -> tuple[float, float | None]:
    """Test loss and test error of ``model`` on the task's test set.

    Args:
        task: the task (its ``x_test``, ``y_test`` and ``loss_fn``).
        model: the model to evaluate (left in its train/eval mode).
        batch_size: examples per forward pass (memory only; the result does not depend on it).

    Returns:
        ``(test_loss, test_error)``: mean loss per example, and the fraction of
        misclassified examples (None for regression tasks).
    """
    return _mean_loss_and_error(task, model, task.x_test, task.y_test, batch_size)


def train_loss(
    task: Task, model: nn.Module, *, size: int = _TRAIN_SUBSET_SIZE, batch_size: int = 2048
) -> float:
    """Mean training loss on a fixed subset of the training data (the same for every run).

    Args:
        task: the task.
        model: the model to evaluate.
        size: examples in the subset (all of them if the training set is smaller).
        batch_size: examples per forward pass.

    Returns:
        Mean loss per example.
    """
    generator = torch.Generator().manual_seed(_TRAIN_SUBSET_SEED)
    if task.x_train is None or task.y_train is None:
        x, y = task.sample_batch(size, generator)
    else:
        idx = torch.randperm(len(task.x_train), generator=generator)[:size]
        x, y = task.x_train[idx], task.y_train[idx]
    return _mean_loss_and_error(task, model, x, y, batch_size)[0]
