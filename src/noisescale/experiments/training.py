"""Train a built-in task with SGD or AdamW while measuring the gradient noise scale.

One optimizer step draws ``B`` units (images, examples or tokens: ``B / units_per_example``
examples, :meth:`noisescale.experiments.tasks.Task.sample_batch`), splits them into ``k``
equal micro-batches, back-propagates ``loss_j / k`` for each (mean loss per micro-batch,
divided by ``k``: the gradient is that of the mean loss over all ``B`` units), lets the
meter read the gradients, then steps (:mod:`noisescale.experiments.optim`)::

    for step in range(steps):
        for xb, yb in micro_batches:          # k of B/k units
            (loss_fn(model(xb), yb) / k).backward()
        meter.update(microbatch_sizes=[B/k] * k)   # before any clipping or optimizer.step()
        optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)
        estimate = meter.compute()            # every `measure_every` steps

Batch sizes are in the task's unit. For ``shakespeare`` (unit tokens, windows of ``T``
predicted tokens, the loss the mean over all of them) the micro-batch sizes are in tokens,
and ``per_example`` is told that each window carries ``T`` tokens
(``update(example_sizes=T)``), so B_simple is in tokens for both methods: with a loss that
is the mean over the ``T`` tokens of each of ``b`` windows, the noise term of a batch is
``tr(Sigma_window)/b = T tr(Sigma_window)/(b T)``, hence ``B_tokens = T B_windows``.

:class:`Trainer` exposes that step for callers with their own loop (a batch-size
sweep that trains to a loss goal); :func:`train` runs it for a number of steps with
an optional per-step callback and stop condition. Runs are deterministic given
``seed`` and the number of torch threads.

B_simple depends on the temperature ``lr / B`` (McCandlish et al. 2018, appendix C): every
:class:`StepRecord` keeps both. Models are evaluated by :mod:`noisescale.experiments.evaluation`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

import noisescale.distributed as nsdist
from noisescale import fsdp
from noisescale.control.controller import BatchChange, BatchSizeController
from noisescale.experiments.adaptive import AdaptiveSettings, make_controller
from noisescale.experiments.optim import check_optimizer, make_optimizer
from noisescale.experiments.records import StepRecord
from noisescale.experiments.tasks import Task, TaskDefaults
from noisescale.meter import GradientNoiseScale, NoiseScaleEstimate, layernorm_groups
from noisescale.options import Averaging, parse_method

__all__ = ["ONLY", "TrainConfig", "TrainResult", "Trainer", "make_meter", "optimizer_and_meter", "train"]

ONLY = (None, "layernorm")  # what a run measures: every parameter, or the LayerNorms only


def make_meter(
    model: nn.Module,
    method: str,
    *,
    ema_decay: float | None,
    ema_examples: float | None,
    confidence: float = 0.95,
    only: str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    groups: Mapping[str, Iterable[nn.Parameter]] | None = None,
) -> GradientNoiseScale:
    """The one place that picks and builds the meter for a training run.

    Args:
        model: the model whose gradients are measured.
        method: ``"per_example"`` (per-example norms, one backward per micro-batch) or
            ``"microbatch"`` (k-way estimator over k >= 2 micro-batches).
        ema_decay: per-step decay of the averages, or None when ``ema_examples`` is given.
        ema_examples: averaging time constant in examples, or None.
        confidence: level of the interval of B_simple.
        only: ``"layernorm"``: measure (and hook) the LayerNorm parameters only
            (:func:`noisescale.meter.layernorm_groups`); None: every parameter.
        optimizer: the run's optimizer: B_simple is also reported per parameter group, and
            under Adam/AdamW the preconditioned estimate too (``preconditioner="adam"``:
            ``estimate.preconditioned``, B_P = tr(P Sigma)/(G^T P G) with Adam's P).
        groups: named parameter groups (an agent's policy and value), or None: one per module.

    Returns:
        A :class:`noisescale.GradientNoiseScale` attached to ``model`` (mean reduction per
        micro-batch, micro-batch losses divided by k before backward).

    Raises:
        ValueError: on an unknown ``only``, or ``only`` with ``groups``.
    """
    if only not in ONLY:
        raise ValueError(f"unknown --only {only!r}: expected {' or '.join(str(o) for o in ONLY if o)}")
    if only is not None and groups is not None:
        raise ValueError(f"--only {only} replaces the task's own parameter groups: leave --only out")
    return GradientNoiseScale(
        model,
        method=parse_method(method),
        reduction="mean",
        accumulation="mean",
        ema_decay=ema_decay,
        ema_examples=ema_examples,
        confidence=confidence,
        groups=groups if only is None else layernorm_groups(nsdist.unwrap_model(model)),
        optimizer=optimizer,
        preconditioner="adam" if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) else None,
    )


def optimizer_and_meter(
    model: nn.Module, config: TrainConfig, groups: Mapping[str, Iterable[nn.Parameter]] | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, GradientNoiseScale | None]:
    """A run's optimizer, its warmup schedule and its meter (None when ``config.method`` is None).

    Args:
        model: the model (wrapped for DDP/FSDP where the run is).
        config: the run's settings.
        groups: the meter's parameter groups (:func:`make_meter`), or None.
    """
    optimizer, scheduler = make_optimizer(
        model.parameters(),
        config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        betas=config.betas,
        warmup_steps=config.warmup_steps,
    )
    if config.method is None:
        return optimizer, scheduler, None
    meter = make_meter(
        model,
        config.method,
        ema_decay=config.ema_decay,
        ema_examples=config.ema_examples,
        confidence=config.confidence,
        only=config.only,
        optimizer=optimizer,
        groups=groups,
    )
    return optimizer, scheduler, meter


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run; :meth:`for_task` fills the task's defaults.

    Attributes:
        batch_size: B, per optimizer step, in the task's unit (images, examples or tokens).
        microbatches: k, equal micro-batches per step (B divisible by k x units_per_example).
        lr: learning rate after the warmup (0 keeps the weights fixed: a measurement at one point).
        steps: optimizer steps :func:`train` runs (a stop condition may end it sooner).
        method: ``"per_example"``, ``"microbatch"``, ``"ddp"`` (any spelling of
            :func:`noisescale.options.parse_method`), or None to train without measuring.
        seed: initial weights and the data stream.
        momentum: SGD momentum (0: plain SGD, the optimizer of the paper's analysis).
        optimizer: ``"sgd"`` or ``"adamw"`` (:func:`noisescale.experiments.optim.make_optimizer`).
        weight_decay: SGD's L2 penalty, or AdamW's decoupled decay of the matrices.
        betas: AdamW's moment decays.
        warmup_steps: steps of the linear learning-rate warmup (0: none).
        units_per_example: units of the task's unit one example carries (1, or the ``T``
            predicted tokens of a ``shakespeare`` window); B is a multiple of it.
        only: ``"layernorm"`` to measure the LayerNorm parameters only (the cheap transformer
            mode, :func:`make_meter`), or None for every parameter.
        ema_decay: per-step decay of the meter's averages (1: plain mean), or None.
        ema_examples: averaging time constant in examples, or None (exactly one of the two,
            validated by :class:`noisescale.options.Averaging`).
        confidence: level of the interval of B_simple.
        measure_every: compute the estimate every this many steps (a host sync each time;
            under DDP it covers the steps the ranks have exchanged, every ``sync_every``).
        threads: ``torch.set_num_threads`` value, or None to leave it as is.
        device: where the model and the batches live (``"cpu"``, ``"cuda"``...); the data
            is sampled on the CPU (reproducible) and each batch is copied over.
        fsdp: under torchrun, shard the model with ``fully_shard`` (FSDP2,
            :func:`noisescale.fsdp.wrap_fsdp`) instead of DDP; implied by ``method="fsdp"``.
    """

    batch_size: int
    microbatches: int
    lr: float
    steps: int
    method: str | None = "per_example"
    seed: int = 0
    momentum: float = 0.0
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    units_per_example: int = 1
    only: str | None = None
    ema_decay: float | None = 0.99
    ema_examples: float | None = None
    confidence: float = 0.95
    measure_every: int = 1
    threads: int | None = None
    device: str = "cpu"
    fsdp: bool = False

    def __post_init__(self) -> None:
        """Validate every field; the messages say what to change."""
        if self.method is not None:
            object.__setattr__(self, "method", parse_method(self.method))
        object.__setattr__(self, "fsdp", self.fsdp or self.method == "fsdp")
        if self.fsdp and self.method == "ddp":
            raise ValueError("the ddp method measures DDP: with --fsdp use --method fsdp or per-example")
        for name in ("batch_size", "microbatches", "measure_every", "units_per_example"):
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
        check_optimizer(
            self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            betas=self.betas,
            warmup_steps=self.warmup_steps,
        )
        step = self.microbatches * self.units_per_example
        if self.batch_size % step:
            whole = (
                f" of whole examples ({self.units_per_example} units each)"
                if self.units_per_example > 1
                else ""
            )
            raise ValueError(
                f"batch size {self.batch_size} is not divisible by {self.microbatches} micro-batches{whole}: "
                f"choose a multiple of {step}"
            )
        if self.method == "microbatch" and self.microbatches < 2:
            raise ValueError(
                "the microbatch method needs at least 2 micro-batches per step (use --microbatches 2 or more)"
            )
        if self.method == "per_example" and self.batch_size < 2 * self.units_per_example:
            raise ValueError("the per-example method needs batches of at least 2 examples")
        Averaging(ema_decay=self.ema_decay, ema_examples=self.ema_examples)  # exactly one, in range

    @classmethod
    def for_task(cls, task: TaskDefaults, **overrides: Any) -> TrainConfig:
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
            "optimizer": task.optimizer,
            "weight_decay": task.weight_decay,
            "warmup_steps": task.warmup_steps,
            "units_per_example": task.units_per_example,
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


class Trainer:
    """A model, its optimizer, its meter and a seeded data stream, advanced one step at a time.

    Use it as a context manager (or call :meth:`close`) so that the meter's hooks are removed.

    Args:
        task: what to train.
        config: hyperparameters (see :meth:`TrainConfig.for_task`).
        dist: this process's rank and world size under DDP, or None.
        adaptive: grow the batch with the noise scale (:mod:`noisescale.experiments.adaptive`):
            ``batch_size`` and ``microbatches`` then follow ``controller``; None: fixed.

    Example:
        >>> from noisescale.experiments.tasks import get_task
        >>> task = get_task("linreg")
        >>> cfg = TrainConfig.for_task(task, steps=3, method=None)
        >>> with Trainer(task, cfg) as trainer:
        ...     record = trainer.step()
        >>> record.step, record.examples
        (1, 16)
    """

    def __init__(
        self,
        task: Task,
        config: TrainConfig,
        *,
        dist: nsdist.DistInfo | None = None,
        adaptive: AdaptiveSettings | None = None,
    ) -> None:
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
            self.model = (fsdp.wrap_fsdp if config.fsdp else nsdist.wrap_ddp)(self.model, dist)
        self.optimizer, self.scheduler, self.meter = optimizer_and_meter(self.model, config)
        self.batch_size, self.microbatches = config.batch_size, config.microbatches  # of the next step
        self.controller: BatchSizeController | None = None
        if adaptive is not None:
            if self.meter is None:
                raise ValueError("an adaptive run needs a meter (a measuring method)")
            self.controller = make_controller(self.meter, self.optimizer, self.scheduler, adaptive, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.steps_done = 0
        self.examples = 0
        self._start = time.perf_counter()

    def step(self) -> StepRecord:
        """One optimizer step (k micro-batches, meter update, update); an estimate every ``measure_every``."""
        cfg, batch, k, units = self.config, self.batch_size, self.microbatches, self.config.units_per_example
        x, y = self.task.sample_batch(batch // units, self.generator)
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
            sizes = [len(yb) * units for _, yb in micro]
            per_unit = units > 1 and self.meter.method == "per_example"  # sizes in units, not examples
            self.meter.update(microbatch_sizes=sizes, example_sizes=units if per_unit else None)
        if self.dist is not None:  # the mean loss of the global batch (equal shares)
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= self.dist.world_size
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if self.controller is not None:  # before the schedule steps: it follows examples seen
            self.controller.step(examples=batch)  # computes the estimate every measure_every steps
            self.batch_size = self.controller.batch_size
            self.microbatches = self.batch_size // (cfg.batch_size // cfg.microbatches)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self.examples += batch
        estimate = None
        if self.meter is not None and self.steps_done % cfg.measure_every == 0:  # no collective
            estimate = self.meter.compute() if self.controller is None else self.controller.last_estimate
        return StepRecord(
            step=self.steps_done,
            examples=self.examples,
            loss=float(loss_sum) / k,
            lr=lr,
            batch_size=batch,
            wall_time=time.perf_counter() - self._start,
            estimate=estimate,
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
        batch_schedule: an adaptive run's batch sizes, from the initial one (else None).
    """

    model: nn.Module
    config: TrainConfig
    records: list[StepRecord]
    estimate: NoiseScaleEstimate | None
    wall_time: float
    stopped: bool
    batch_schedule: list[BatchChange] | None = None


R = TypeVar("R", bound=StepRecord, covariant=True)


class Stepper(Protocol[R]):
    """Anything advanced one optimizer step at a time: :class:`Trainer`, the RL trainer."""

    def step(self) -> R:
        """Run one step; its record."""
        ...


def run_steps(
    trainer: Stepper[R],
    steps: int,
    callback: Callable[[StepRecord], None] | None,
    stop: Callable[[R, Any], bool] | None,
) -> tuple[list[R], bool]:
    """Step ``trainer`` ``steps`` times, or until ``stop(record, trainer)`` returns True.

    The one step loop of :func:`train` and the RL loop: ``callback(record)`` after every step,
    then ``stop``. Returns the records and whether ``stop`` ended the loop early.
    """
    records: list[R] = []
    for _ in range(steps):
        record = trainer.step()
        records.append(record)
        if callback is not None:
            callback(record)
        if stop is not None and stop(record, trainer):
            return records, True
    return records, False


def train(
    task: Task,
    config: TrainConfig,
    *,
    callback: Callable[[StepRecord], None] | None = None,
    stop: Callable[[StepRecord, Trainer], bool] | None = None,
    dist: nsdist.DistInfo | None = None,
    adaptive: AdaptiveSettings | None = None,
) -> TrainResult:
    """Train ``task`` for ``config.steps`` steps, or until ``stop`` returns True.

    Args:
        task: what to train.
        config: hyperparameters.
        callback: called with every step's record (progress bars, logging).
        stop: ``stop(record, trainer)`` after every step; True ends the run (e.g. a loss goal
            checked with :func:`evaluate` on ``trainer.model``).
        dist: this process's rank and world size under DDP (:mod:`noisescale.distributed`), or None.
        adaptive: grow the batch with the noise scale (see :class:`Trainer`), or None.

    Returns:
        The model, the records and the final estimate.
    """
    start = time.perf_counter()
    with Trainer(task, config, dist=dist, adaptive=adaptive) as trainer:
        records, stopped = run_steps(trainer, config.steps, callback, stop)
        estimate = trainer.estimate()  # every step (under DDP a collective, on every rank)
        model = nsdist.unwrap_model(trainer.model)  # rank 0 alone may evaluate it: no DDP collectives
        if config.fsdp and dist is not None:  # FSDP2: a whole copy (gathered on every rank) for rank 0
            model = task.make_model(config.seed).to(config.device)
            model.load_state_dict(fsdp.full_state_dict(trainer.model))
    schedule = None if trainer.controller is None else trainer.controller.schedule
    return TrainResult(model, config, records, estimate, time.perf_counter() - start, stopped, schedule)
