"""Lightning callback: the batch size follows the noise scale through ``accumulate_grad_batches``.

Usage::

    from noisescale.control import SGDRule
    from noisescale.integrations.lightning import NoiseScaleCallback
    from noisescale.integrations.lightning_batch import BatchSizeCallback

    noise = NoiseScaleCallback()
    batch = BatchSizeCallback(noise, micro_batch_size=32, max_batch_size=4096, rule=SGDRule())
    trainer = lightning.Trainer(accumulate_grad_batches=2, callbacks=[noise, batch])   # noise first
    trainer.fit(model, loader)                  # the loader's batch_size is the micro-batch: 32

The micro-batch (the loader's batch) stays fixed; the callback changes
``trainer.accumulate_grad_batches``, the micro-batches per optimizer step, as the
:class:`~noisescale.control.controller.BatchSizeController` decides (the initial global batch is
``micro_batch_size x accumulate_grad_batches x world_size``). Lightning closes a window when the
epoch's batch count is a multiple of ``accumulate_grad_batches``, so a growth by k waits for the
first step where that count is a multiple of the new number (at most k - 1 steps, as OLMo-core's
batch-size scheduler waits); the optimizer rule (:mod:`noisescale.control.rules`) is applied then,
to the optimizer and the LR schedulers of the Trainer. The decision itself is made when the step's
gradients are folded in (``on_before_optimizer_step``), so an examples-keyed schedule
(:func:`noisescale.control.schedules.key_by_examples` with ``lambda: callback.controller.examples``)
sees the step's examples when Lightning steps it.

Checkpoints: the controller's state, the pending change and the applied accumulation are saved with
the callback (``state_dict``), and restored when fitting resumes.

Requires the ``lightning`` extra: ``pip install 'noisescale[lightning]'``.
"""

from __future__ import annotations

from typing import Any

from noisescale.integrations import BatchCallback, require

require("lightning.pytorch", "lightning")  # the install command if missing, before the imports below
_data = require("lightning.pytorch.utilities.data", "lightning")

from lightning.pytorch import Callback  # noqa: E402

from noisescale.control.controller import BatchSizeController  # noqa: E402
from noisescale.control.rules import OptimizerRule, check_rule  # noqa: E402
from noisescale.integrations.lightning import NoiseScaleCallback  # noqa: E402

__all__ = ["BatchSizeCallback"]


class BatchSizeCallback(Callback, BatchCallback):
    """Grow the batch with the measured B_simple, through ``accumulate_grad_batches``.

    Args:
        noise: the :class:`~noisescale.integrations.lightning.NoiseScaleCallback` of the same
            Trainer, listed BEFORE this callback (its meter feeds the controller).
        micro_batch_size: examples per loader batch on one rank.
        rule: rescale the optimizer (and the Trainer's LR schedulers) at each change; None: leave it.
        **settings: the controller's (``max_batch_size``, ``critical_factor`` or ``exchange_rate``,
            ``hysteresis``, ``min_examples_between``, ``allow_decrease``, ``check_every``...).

    Attributes:
        controller: the :class:`~noisescale.control.controller.BatchSizeController` (set when fitting
            starts); its ``schedule`` records each decision (``lr`` None: the rule is applied when
            the change is).

    Raises:
        RuntimeError: when fitting starts, if the NoiseScaleCallback is listed after this one.
        ValueError: when fitting starts, for invalid settings (see the controller).
    """

    def __init__(self, noise: NoiseScaleCallback, *, micro_batch_size: int, rule: OptimizerRule | None = None,
                 **settings: Any) -> None:  # fmt: skip
        super().__init__()
        self.noise = noise
        self.micro_batch_size = micro_batch_size
        self.rule = rule
        self.settings = settings
        self.controller: BatchSizeController | None = None
        self._pending: tuple[int, int, float] | None = None  # (batch before, batch after, B_simple)
        self._sizes: list[int] = []  # micro-batch sizes of the current window, this rank
        self._saved: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Create the controller over the noise callback's meter (and resume it)."""
        if self.noise.meter is None:
            raise RuntimeError("list the NoiseScaleCallback before the BatchSizeCallback in callbacks=[...]")
        if self._saved is not None:
            trainer.accumulate_grad_batches = self._saved["accumulate_grad_batches"]
        world = trainer.world_size
        batch = (
            self.micro_batch_size
            * world
            * (
                trainer.accumulate_grad_batches
                if self._saved is None
                else self._saved["initial_accumulation"]
            )
        )
        self.controller = BatchSizeController(
            self.noise.meter, batch_size=batch, micro_batch_size=self.micro_batch_size, world_size=world,
            **self.settings,
        )  # fmt: skip
        self._initial_accumulation = batch // (self.micro_batch_size * world)
        if self.rule is not None:
            check_rule(self.rule, trainer.optimizers[0], batch_size=batch,
                       max_batch_size=self.controller.policy.max_batch_size)  # fmt: skip
        if self._saved is not None:
            self.controller.load_state_dict(self._saved["controller"])
            pending = self._saved["pending"]
            self._pending = None if pending is None else (int(pending[0]), int(pending[1]), float(pending[2]))
            self._saved = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Count the micro-batch's examples (dim 0 of its first tensor)."""
        self._sizes.append(int(_data.extract_batch_size(batch)))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Count the step (every rank's examples) and decide; a change waits for its window."""
        sizes, self._sizes = self._sizes, []
        world = trainer.world_size
        self._decide(sum(sizes) * world, self.micro_batch_size * world * trainer.accumulate_grad_batches)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """A new epoch starts a window: apply a pending change."""
        self._sizes = []
        self._apply(trainer, ready=0)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Apply a pending change once the epoch's batch count is a multiple of the new accumulation."""
        self._apply(trainer, ready=trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def _apply(self, trainer: Any, *, ready: int) -> None:
        accumulation = self._due(ready, self.micro_batch_size * trainer.world_size)
        if accumulation is None:
            return
        trainer.accumulate_grad_batches = accumulation
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        self._apply_rule(trainer.optimizers[0].param_groups, schedulers)

    def state_dict(self) -> dict[str, Any]:
        """The controller's state, the pending change and the accumulation in force."""
        if self.controller is None:
            return {}
        applied = self.controller.schedule[-1].batch_size if self._pending is None else self._pending[0]
        return {
            "controller": self.controller.state_dict(),
            "pending": None if self._pending is None else list(self._pending),
            "accumulate_grad_batches": applied // (self.micro_batch_size * self.controller.policy.world_size),
            "initial_accumulation": self._initial_accumulation,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume (applied when fitting starts)."""
        self._saved = dict(state_dict) or None
