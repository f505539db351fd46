"""Adaptive runs of the built-in tasks: the batch grows with the measured noise scale.

An adaptive :class:`~noisescale.experiments.training.Trainer` keeps its micro-batch
(``batch_size / microbatches`` of the configuration, in the task's unit) and lets a
:class:`~noisescale.control.controller.BatchSizeController` decide, at every measuring step, how many
micro-batches make the next step (McCandlish et al. 2018, section 2.3 and appendix D). At each change
the optimizer follows its rule (:mod:`noisescale.control.rules`): SGD by eq. 2.6 (:class:`SGDRule`);
AdamW by the square-root rule on the learning rate and eps and the kept weight-decay timescale, with
the betas left alone (:class:`AdamRule` ``(betas=False)``: Malladi et al.'s betas rule would allow at
most 10x growth at beta1 = 0.9). The run's warmup, written in steps of the initial batch, is re-keyed
by examples seen (:func:`noisescale.control.schedules.key_by_examples`), so it ends after the same
examples whatever the batch does.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from noisescale.control.controller import BatchSizeController
from noisescale.control.policy import BatchSizePolicy
from noisescale.control.rules import AdamRule, OptimizerRule, SGDRule
from noisescale.control.schedules import key_by_examples
from noisescale.meter import GradientNoiseScale

if TYPE_CHECKING:
    from noisescale.experiments.training import TrainConfig

__all__ = ["AdaptiveSettings", "make_controller", "policy_of"]


@dataclasses.dataclass(frozen=True)
class AdaptiveSettings:
    """The controller's targets and limits in an adaptive run (units: the task's).

    Attributes:
        max_batch_size: the largest global batch, or None (no limit).
        critical_factor: track ``B = c B_simple`` (default c = 1).
        exchange_rate: track ``B = sqrt(r B_simple)`` instead (r units per step).
        hysteresis: the margin the interval's bound must clear.
        min_examples_between: units seen between two changes.
        max_lr: the learning rate is never raised above it (eps_max of eq. 2.6), or None.
    """

    max_batch_size: int | None = None
    critical_factor: float | None = None
    exchange_rate: float | None = None
    hysteresis: float = 0.1
    min_examples_between: int = 0
    max_lr: float | None = None


def policy_of(settings: AdaptiveSettings, config: TrainConfig, world_size: int) -> BatchSizePolicy:
    """The controller's settings for a run: B0 and its micro-batch from ``config``, then ``settings``.

    Call it before training to refuse bad settings early.

    Raises:
        ValueError: for invalid settings (:class:`noisescale.control.policy.BatchSizePolicy`).
    """
    return BatchSizePolicy(
        batch_size=config.batch_size,
        micro_batch_size=config.batch_size // config.microbatches,
        world_size=world_size,
        max_batch_size=settings.max_batch_size,
        critical_factor=settings.critical_factor,
        exchange_rate=settings.exchange_rate,
        hysteresis=settings.hysteresis,
        min_examples_between=settings.min_examples_between,
    )


def make_controller(
    meter: GradientNoiseScale,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    settings: AdaptiveSettings,
    config: TrainConfig,
) -> BatchSizeController:
    """The controller of an adaptive run, its rule, and the warmup re-keyed by examples.

    Args:
        meter: the run's meter.
        optimizer: the run's optimizer.
        scheduler: its warmup schedule (steps at the initial batch), re-keyed in place.
        settings: targets and limits.
        config: the run's: the initial batch B0 and its ``microbatches`` (all ranks; the micro-batch
            is ``B0 / microbatches``), the optimizer (picks the rule), ``measure_every`` (steps between
            looks at the estimate).

    Raises:
        ValueError: for invalid settings (:func:`policy_of`).
    """
    cap = settings.max_lr
    rule: OptimizerRule = (
        SGDRule(max_lr=cap) if config.optimizer == "sgd" else AdamRule(betas=False, max_lr=cap)
    )
    controller = BatchSizeController(
        meter,
        **dataclasses.asdict(policy_of(settings, config, meter.world_size)),
        check_every=config.measure_every,
        optimizer=optimizer,
        rule=rule,
        schedulers=[scheduler],
    )
    key_by_examples(scheduler, lambda: controller.examples, examples_per_step=config.batch_size)
    return controller
