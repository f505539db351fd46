"""Lightning callback: the gradient noise scale of a ``Trainer.fit`` run, in its own logger.

Usage::

    from noisescale.integrations.lightning import NoiseScaleCallback

    trainer = lightning.Trainer(accumulate_grad_batches=4, callbacks=[NoiseScaleCallback()])
    trainer.fit(model)

The method follows the run: ``"ddp"`` under the DDP strategy (replicas x accumulated
micro-batches), ``"microbatch"`` with ``accumulate_grad_batches >= 2``, else
``"per_example"``. Lightning divides every micro-batch loss by
``accumulate_grad_batches`` (``accumulation="mean"``); the short last window of an
epoch is divided by the same number, so that step is discarded rather than measured
with the wrong weights. The meter reads the gradients in ``on_before_optimizer_step``,
which Lightning calls after unscaling AMP gradients and before clipping them.

Logged every ``log_every_n_steps`` optimizer steps through ``LightningModule.log_dict``
(hence every logger the Trainer has): the scalars of
:func:`noisescale.integrations.estimate_scalars`.

Requires the ``lightning`` extra: ``pip install 'noisescale[lightning]'``.
"""

from __future__ import annotations

from typing import Any

from noisescale.integrations import MeterCallback, require

require("lightning.pytorch", "lightning")  # the install command if missing, before the imports below
_data = require("lightning.pytorch.utilities.data", "lightning")

from lightning.pytorch import Callback  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from noisescale.meter import GradientNoiseScale, default_groups  # noqa: E402
from noisescale.options import Method, parse_method  # noqa: E402

__all__ = ["NoiseScaleCallback"]


class NoiseScaleCallback(Callback, MeterCallback):
    """Measure B_simple during ``fit`` and log it with the LightningModule's logger.

    Args:
        method: force ``"microbatch"``, ``"per_example"`` or ``"ddp"`` (default: from the run).
        log_every_n_steps: optimizer steps between logs (default: the Trainer's); each log
            is one host synchronisation (under DDP also one small collective:
            ``meter.sync()``).
        prefix: name prefix of the logged scalars.
        log_groups: also log per module and per optimizer parameter group.
        **meter_kwargs: passed to :class:`noisescale.GradientNoiseScale` (``reduction``,
            ``ema_decay``, ``ema_examples``, ``groups``, ...).

    Attributes:
        meter: the :class:`~noisescale.GradientNoiseScale` (set when fitting starts).
        last_estimate: what was logged last, or None.
    """

    def __init__(
        self,
        method: str | None = None,
        *,
        log_every_n_steps: int | None = None,
        prefix: str = "noise_scale",
        log_groups: bool = True,
        **meter_kwargs: Any,
    ) -> None:
        super().__init__()
        self._configure(method, log_every_n_steps, prefix, log_groups, meter_kwargs)
        self._stepped = False
        self._saved: dict[str, Any] | None = None

    def _choose_method(self, trainer: Any, model: Any) -> Method:
        if self.method is not None:
            return parse_method(self.method)
        if isinstance(model, DistributedDataParallel):
            return "ddp"
        return "microbatch" if trainer.accumulate_grad_batches >= 2 else "per_example"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach the meter to the model as the strategy prepared it (DDP-wrapped or not)."""
        model = trainer.strategy.model
        kwargs = dict(self.meter_kwargs)
        kwargs.setdefault("groups", default_groups(pl_module))  # names without the wrappers' prefixes
        kwargs.setdefault("accumulation", "mean")  # Lightning divides by accumulate_grad_batches
        kwargs.setdefault("scaler", getattr(trainer.precision_plugin, "scaler", None))
        if len(trainer.optimizers) == 1:
            kwargs.setdefault("optimizer", trainer.optimizers[0])
        target = model if isinstance(model, DistributedDataParallel) else pl_module
        self.meter = GradientNoiseScale(target, method=self._choose_method(trainer, model), **kwargs)
        if self._saved is not None:
            self.meter.load_state_dict(self._saved)
            self._saved = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Remember the micro-batch's size (examples: dim 0 of its first tensor)."""
        self._sizes.append(int(_data.extract_batch_size(batch)))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Fold in the step: after the last backward and AMP unscaling, before clipping."""
        meter = self.meter
        assert meter is not None, "on_fit_start did not run"
        sizes, self._sizes = self._sizes, []
        if meter.method != "per_example" and len(sizes) != trainer.accumulate_grad_batches:
            meter.discard()  # short window: Lightning still divided the loss by the full count
            return
        self._fold_step(sizes)
        self._stepped = True

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log every ``log_every_n_steps`` optimizer steps."""
        if not self._stepped or self.meter is None:
            return
        self._stepped = False
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every:
            return
        pl_module.log_dict(self._log_scalars(), on_step=True, on_epoch=False, prog_bar=False, logger=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Fold in every step (on every rank) and detach the hooks; the meter keeps its estimate."""
        if self.meter is not None:
            self.meter.sync()
            self.meter.remove()

    def state_dict(self) -> dict[str, Any]:
        """The meter's averages of every step so far, saved in Lightning checkpoints.

        Lightning asks every rank for it (``dump_checkpoint``), so under DDP the steps
        since the last exchange are exchanged first (``meter.sync()``).
        """
        if self.meter is None:
            return {}
        self.meter.sync()
        return self.meter.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the averages (applied when the meter is created)."""
        self._saved = dict(state_dict) or None
