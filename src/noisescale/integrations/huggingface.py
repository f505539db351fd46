"""Hugging Face ``Trainer`` callback: the gradient noise scale, logged with the Trainer's own ``log``.

Usage::

    from noisescale.integrations.huggingface import NoiseScaleCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(NoiseScaleCallback(trainer))
    trainer.train()

The callback needs the Trainer: callbacks are not given the DDP-wrapped model, the AMP
scaler or the loss conventions. It follows the run:

- method: ``"ddp"`` when the Trainer wrapped the model in DistributedDataParallel
  (torchrun), ``"microbatch"`` with ``gradient_accumulation_steps >= 2``, else
  ``"per_example"``;
- loss conventions, as the Trainer applies them: when it normalises the loss by the
  number of label tokens of the whole step (``num_items_in_batch``: models taking loss
  keyword arguments, e.g. causal language models, with ``labels`` in the batch), batch
  sizes are counted in tokens and ``accumulation="example_mean"``; otherwise the loss is
  a mean over the micro-batch divided by the number of micro-batches, and sizes are
  examples (dim 0 of the inputs);
- the Trainer clips gradients before ``on_pre_optimizer_step``, so when it clips the big
  batch is read at the end of each backward (``read_grad="after_backward"``; under DDP
  after the all-reduce).

Logged every ``logging_steps`` optimizer steps through ``Trainer.log`` (so every
``report_to`` integration and ``state.log_history`` get it): the scalars of
:func:`noisescale.integrations.estimate_scalars`.

Requires the ``hf`` extra: ``pip install 'noisescale[hf]'``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from noisescale.integrations import MeterCallback, require
from noisescale.meter import GradientNoiseScale, default_groups
from noisescale.options import Method, parse_method

require("transformers", "hf")  # the install command if missing, before the import below

from transformers import TrainerCallback  # noqa: E402

__all__ = ["NoiseScaleCallback"]


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


class NoiseScaleCallback(TrainerCallback, MeterCallback):
    """Measure B_simple during ``Trainer.train`` and log it with ``Trainer.log``.

    Args:
        trainer: the ``transformers.Trainer`` this callback is added to.
        method: force ``"microbatch"``, ``"per_example"`` or ``"ddp"`` (default: from the run).
        log_every_n_steps: optimizer steps between logs (default: ``args.logging_steps``).
        prefix: name prefix of the logged scalars.
        log_groups: also log per module and per optimizer parameter group.
        **meter_kwargs: passed to :class:`noisescale.GradientNoiseScale` (``ema_decay``, ...).

    Attributes:
        meter: the :class:`~noisescale.GradientNoiseScale` (set when training starts).
        unit: ``"tokens"`` or ``"examples"``, the unit of the batch sizes and of B_simple.
        last_estimate: what was logged last, or None.

    Raises:
        ValueError: at the first step, if the Trainer normalises the loss by tokens across
            replicas without ``average_tokens_across_devices`` (each replica would weight
            its tokens differently), or if a token-normalised loss meets ``per_example``.
    """

    def __init__(
        self,
        trainer: Any,
        *,
        method: str | None = None,
        log_every_n_steps: int | None = None,
        prefix: str = "noise_scale",
        log_groups: bool = True,
        **meter_kwargs: Any,
    ) -> None:
        self._configure(method, log_every_n_steps, prefix, log_groups, meter_kwargs)
        self.trainer = trainer
        self.unit: str | None = None
        self._handle: Any = None

    def _choose_method(self, args: Any, wrapped: nn.Module) -> Method:
        if self.method is not None:
            return parse_method(self.method)
        if isinstance(wrapped, DistributedDataParallel):
            return "ddp"
        return "microbatch" if args.gradient_accumulation_steps >= 2 else "per_example"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Attach the meter to the model the Trainer prepared, and count each micro-batch."""
        wrapped, model = self.trainer.model_wrapped, self.trainer.model
        ddp = isinstance(wrapped, DistributedDataParallel)
        options = dict(self.meter_kwargs)
        options.setdefault("groups", default_groups(model))
        options.setdefault("scaler", getattr(self.trainer.accelerator, "scaler", None))
        options.setdefault("optimizer", self.trainer.optimizer)
        if args.max_grad_norm and args.max_grad_norm > 0:
            options.setdefault("read_grad", "after_backward")  # the Trainer clips before our hook
        self.meter = GradientNoiseScale(
            wrapped if ddp else model, method=self._choose_method(args, wrapped), **options
        )
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _token_normalised(self, kwargs: dict[str, Any]) -> bool:
        """Whether the Trainer divides this run's loss by the step's label tokens (num_items_in_batch)."""
        trainer = self.trainer
        takes = trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None
        return bool(takes) and ("labels" in kwargs or "shift_labels" in kwargs)

    def _settle_unit(self, kwargs: dict[str, Any]) -> None:
        meter = self.meter
        assert meter is not None
        tokens = self._token_normalised(kwargs)
        self.unit = "tokens" if tokens else "examples"
        if not tokens:
            meter.reduction, meter.accumulation = "mean", "mean"  # Trainer: loss / micro-batches
            return
        if meter.method == "per_example":
            raise ValueError(
                "the Trainer normalises this loss by the label tokens of the whole step: per-example "
                "norms would be per sequence. Use gradient_accumulation_steps >= 2 (microbatch method)."
            )
        if meter.world_size > 1 and not self.trainer.args.average_tokens_across_devices:
            raise ValueError(
                "with several replicas and a token-normalised loss, set "
                "TrainingArguments(average_tokens_across_devices=True) so every token weighs the same"
            )
        meter.accumulation = "example_mean"

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: the size of each training micro-batch (tokens or examples)."""
        if not (module.training and torch.is_grad_enabled()) or self.meter is None:
            return
        if self.unit is None:
            self._settle_unit(kwargs)
        if self.unit == "tokens":
            labels = kwargs.get("shift_labels")
            if labels is None:
                labels = kwargs["labels"]
                labels = labels[..., 1:] if getattr(self.trainer, "_loss_shifts_labels", False) else labels
            self._sizes.append(int(labels.ne(-100).sum()))  # one host read per micro-batch
            return
        first = _first_tensor(args, kwargs)
        self._sizes.append(0 if first is None else int(first.shape[0]))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Fold in the step (its gradients were read before clipping)."""
        sizes, self._sizes = self._sizes, []
        self._fold_step(sizes)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Log every ``log_every_n_steps`` optimizer steps through ``Trainer.log``."""
        every = self.log_every_n_steps or args.logging_steps
        if every < 1:  # a fraction of the run, as TrainingArguments allows
            every = math.ceil(state.max_steps * every)
        if self.meter is None or state.global_step % max(1, int(every)):
            return
        should_log = control.should_log  # Trainer.log clears it: keep the Trainer's own log of this step
        self.trainer.log(self._log_scalars())
        control.should_log = should_log

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Fold in every step (on every rank) and detach the hooks; the meter keeps its estimate."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.meter is not None:
            self.meter.sync()
            self.meter.remove()
