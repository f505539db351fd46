"""Train a built-in task with plain SGD while measuring the gradient noise scale.

One optimizer step draws ``B`` examples (:meth:`noisescale.experiments.tasks.Task.sample_batch`),
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

:class:`Probe` is the one evaluation of a model on fixed subsets (training loss on a subset of
the training set, loss and error on a subset of the test set), the same for every run of a
seed: ``noisescale measure`` and every run of a sweep evaluate through it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import noisescale.distributed as nsdist
from noisescale.experiments.tasks import Task
from noisescale.meter import GradientNoiseScale, NoiseScaleEstimate
from noisescale.options import Averaging, parse_method

__all__ = [
    "Probe",
    "StepRecord",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "evaluate",
    "make_meter",
    "train",
    "train_loss",
]

_SUBSET_SEED = 0  # seed of the fixed evaluation subsets, the same for every run
_TRAIN_SUBSET_SIZE = 10_000
_EVAL_CHUNK = 2048  # examples per forward pass when evaluating (memory only)


def make_meter(
    model: nn.Module,
    method: str,
    *,
    ema_decay: float | None,
    ema_examples: float | None,
    confidence: float = 0.95,
) -> GradientNoiseScale:
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
    return GradientNoiseScale(
        model,
        method=parse_method(method),
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
        method: ``"per_example"``, ``"microbatch"``, ``"ddp"`` (any spelling of
            :func:`noisescale.options.parse_method`), or None to train without measuring.
        seed: initial weights and the data stream.
        momentum: SGD momentum (0: plain SGD, the optimizer of the paper's analysis).
        ema_decay: per-step decay of the meter's averages (1: plain mean), or None.
        ema_examples: averaging time constant in examples, or None (exactly one of the two,
            validated by :class:`noisescale.options.Averaging`).
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
            object.__setattr__(self, "method", parse_method(self.method))
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
        Averaging(ema_decay=self.ema_decay, ema_examples=self.ema_examples)  # exactly one, in range

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
        per_example = method is not None and parse_method(method) == "per_example"
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
    estimate: NoiseScaleEstimate | None = None

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready record.

        B_simple and its interval are the meter's: None while the estimate is not resolved
        (:class:`~noisescale.meter.NoiseScaleEstimate` never gives an unresolved ratio).
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
                b_simple=est.b_simple,
                b_simple_ci=None if est.b_simple_ci is None else list(est.b_simple_ci),
                b_simple_se=est.b_simple_se,
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
        >>> from noisescale.experiments.tasks import get_task
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
        self.meter: GradientNoiseScale | None = (
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
        """One optimizer step (k micro-batches, meter update, SGD); an estimate every ``measure_every``."""
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
        measuring = self.steps_done % cfg.measure_every == 0
        return StepRecord(
            step=self.steps_done,
            examples=self.examples,
            loss=float(loss_sum) / k,
            lr=lr,
            batch_size=cfg.batch_size,
            wall_time=time.perf_counter() - self._start,
            # no collective: DDP exchanges every 16
            estimate=self.meter.compute() if self.meter is not None and measuring else None,
        )

    def estimate(self) -> NoiseScaleEstimate | None:
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
    estimate: NoiseScaleEstimate | None
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
        dist: this process's rank and world size under DDP (:mod:`noisescale.distributed`), or None.

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
    task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = _EVAL_CHUNK
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


class Probe:
    """Fixed evaluation subsets of a task, the same for every run: training loss, test loss and error.

    The subsets are drawn once from a generator seeded with ``seed``: the training subset first
    (a random permutation of the training set, or fresh draws of an infinite task), then the test
    subset from the same generator.

    Args:
        task: the task.
        train_examples: examples in the training subset (all of them if the set is smaller).
        test_examples: examples in the test subset; None for the whole test set.
        seed: seed of the subsets.

    Example:
        >>> from noisescale.experiments.tasks import get_task
        >>> probe = Probe(get_task("linreg"), train_examples=64, test_examples=32)
        >>> len(probe.y), len(probe.y_test)
        (64, 32)
    """

    def __init__(
        self, task: Task, train_examples: int, test_examples: int | None = None, *, seed: int = _SUBSET_SEED
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        if task.x_train is None or task.y_train is None:
            self.x, self.y = task.sample_batch(train_examples, gen)
        else:
            idx = torch.randperm(len(task.x_train), generator=gen)[:train_examples]
            self.x, self.y = task.x_train[idx], task.y_train[idx]
        if test_examples is None:
            self.x_test, self.y_test = task.x_test, task.y_test
        else:
            idx = torch.randperm(len(task.x_test), generator=gen)[:test_examples]
            self.x_test, self.y_test = task.x_test[idx], task.y_test[idx]
        self.task = task

    def train_loss(self, model: nn.Module) -> float:
        """Mean loss per example on the training subset."""
        return _mean_loss_and_error(self.task, model, self.x, self.y)[0]

    def test(self, model: nn.Module) -> tuple[float, float | None]:
        """``(test_loss, test_error)`` on the test subset; the error is None for regression tasks."""
        return _mean_loss_and_error(self.task, model, self.x_test, self.y_test)


def evaluate(task: Task, model: nn.Module, *, batch_size: int = _EVAL_CHUNK) -> tuple[float, float | None]:
    """Test loss and test error of ``model`` on the task's whole test set.

    Returns:
        ``(test_loss, test_error)``: mean loss per example, and the fraction misclassified
        (None for regression tasks). ``batch_size`` only bounds the memory of a forward pass.
    """
    return _mean_loss_and_error(task, model, task.x_test, task.y_test, batch_size)


def train_loss(task: Task, model: nn.Module, *, size: int = _TRAIN_SUBSET_SIZE) -> float:
    """Mean loss per example on the fixed training subset of :class:`Probe` of ``size`` examples."""
    return Probe(task, size, test_examples=0).train_loss(model)
