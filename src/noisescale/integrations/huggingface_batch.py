"""Hugging Face ``Trainer`` callback: the batch follows the noise scale via ``gradient_accumulation_steps``.

Usage::

    from noisescale.control import AdamRule
    from noisescale.integrations.huggingface import NoiseScaleCallback
    from noisescale.integrations.huggingface_batch import BatchSizeCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    noise = NoiseScaleCallback(trainer)
    trainer.add_callback(noise)                                     # first: its meter feeds the controller
    trainer.add_callback(BatchSizeCallback(trainer, noise, max_batch_size=4096, rule=AdamRule(betas=False)))
    trainer.train()

The micro-batch (``per_device_train_batch_size``) stays fixed; the callback sets
``args.gradient_accumulation_steps``, which the Trainer reads at every optimizer step, as the
:class:`~noisescale.control.controller.BatchSizeController` decides. The Trainer closes a window when
the epoch's micro-batch count is a multiple of ``gradient_accumulation_steps``, so a growth by k waits
for the first step where that count is a multiple of the new number (at most k - 1 steps); the
optimizer rule (:mod:`noisescale.control.rules`) is applied then, to ``trainer.optimizer`` and
``trainer.lr_scheduler``. By default the Trainer's schedule (a ``LambdaLR`` written in steps) is re-keyed
by examples seen (:func:`noisescale.control.schedules.key_by_examples`, one step = the initial batch), so
warmup and decay keep their length in examples; the decision and the count are made in
``on_optimizer_step``, before the Trainer steps the schedule.

Units: the controller counts ``per_device_train_batch_size x units_per_example`` units per micro-batch
and compares them with B_simple, which is in the noise callback's unit: examples, or tokens when the
Trainer normalises the loss by label tokens; then give ``units_per_example`` (tokens per sequence,
for packed fixed-length sequences).

Limits: the Trainer plans its epochs at the start (``max_steps``, or the steps of
``num_train_epochs``): a larger batch consumes the epochs in fewer steps, so give the budget as
``num_train_epochs`` (examples), not ``max_steps``. The callback's state is not saved in the Trainer's
checkpoints (the Trainer rebuilds stateful callbacks from JSON arguments, which cannot hold the
meter), and neither is the noise callback's: resume with a Lightning or plain loop for exact decisions.

Requires the ``hf`` extra: ``pip install 'noisescale[hf]'``.
"""

from __future__ import annotations

from typing import Any

from noisescale.control.controller import BatchSizeController
from noisescale.control.rules import OptimizerRule, check_rule
from noisescale.control.schedules import key_by_examples
from noisescale.integrations import BatchCallback, require
from noisescale.integrations.huggingface import NoiseScaleCallback

require("transformers", "hf")  # the install command if missing, before the import below

from transformers import TrainerCallback  # noqa: E402

__all__ = ["BatchSizeCallback"]


class BatchSizeCallback(TrainerCallback, BatchCallback):
    """Grow the batch with the measured B_simple, through ``gradient_accumulation_steps``.

    Args:
        trainer: the ``transformers.Trainer`` this callback is added to.
        noise: its :class:`~noisescale.integrations.huggingface.NoiseScaleCallback`, added BEFORE this one.
        rule: rescale the optimizer and the scheduler's base rates at each change; None: leave them.
        units_per_example: units of B_simple per example (1; tokens per sequence for token losses).
        key_schedule_by_examples: re-key ``trainer.lr_scheduler`` by examples seen (default).
        **settings: the controller's (``max_batch_size``, ``critical_factor`` or ``exchange_rate``,
            ``hysteresis``, ``min_examples_between``, ``allow_decrease``, ``check_every``...), in units.

    Attributes:
        controller: the :class:`~noisescale.control.controller.BatchSizeController` (set when
            training starts).

    Raises:
        RuntimeError: when training starts, if the noise callback was added after this one.
        ValueError: when training starts, for invalid settings (see the controller).
    """

    def __init__(
        self,
        trainer: Any,
        noise: NoiseScaleCallback,
        *,
        rule: OptimizerRule | None = None,
        units_per_example: int = 1,
        key_schedule_by_examples: bool = True,
        **settings: Any,
    ) -> None:
        self.trainer = trainer
        self.noise = noise
        self.rule = rule
        self.units_per_example = units_per_example
        self.key_schedule_by_examples = key_schedule_by_examples
        self.settings = settings
        self.controller: BatchSizeController | None = None
        self._pending: tuple[int, int, float] | None = None  # (batch before, batch after, B_simple)
        self._in_epoch = 0  # micro-batches of this epoch so far
        self._in_window = 0  # micro-batches since the last optimizer step

    @property
    def _granule(self) -> int:
        args = self.trainer.args
        return int(args.per_device_train_batch_size) * self.units_per_example * int(args.world_size)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Create the controller over the noise callback's meter; re-key the schedule by examples."""
        if self.noise.meter is None:
            raise RuntimeError(
                "add the NoiseScaleCallback before the BatchSizeCallback (trainer.add_callback)"
            )
        batch = self._granule * int(args.gradient_accumulation_steps)
        self.controller = BatchSizeController(
            self.noise.meter,
            batch_size=batch,
            micro_batch_size=int(args.per_device_train_batch_size) * self.units_per_example,
            world_size=int(args.world_size),
            **self.settings,
        )
        if self.rule is not None:
            check_rule(self.rule, self.trainer.optimizer, batch_size=batch,
                       max_batch_size=self.controller.policy.max_batch_size)  # fmt: skip
        if self.key_schedule_by_examples:
            controller = self.controller
            key_by_examples(self.trainer.lr_scheduler, lambda: controller.examples, examples_per_step=batch)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A new epoch starts a window: apply a pending change."""
        self._in_epoch = self._in_window = 0
        self._apply(args)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A micro-batch that did not end the window."""
        self._in_epoch += 1
        self._in_window += 1

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Count the step and decide (before the Trainer steps its schedule); apply once aligned."""
        self._in_epoch += 1
        window, self._in_window = self._in_window + 1, 0
        self._decide(window * self._granule, self._granule * int(args.gradient_accumulation_steps))
        self._apply(args)

    def _apply(self, args: Any) -> None:
        steps = self._due(self._in_epoch, self._granule)
        if steps is None:
            return
        args.gradient_accumulation_steps = steps
        self._apply_rule(self.trainer.optimizer.param_groups, [self.trainer.lr_scheduler])
