"""Drop-in integrations: Lightning, the Hugging Face Trainer and TensorBoard (optional extras).

Each framework is imported only when its module is::

    from noisescale.integrations.lightning import NoiseScaleCallback       # noisescale[lightning]
    from noisescale.integrations.huggingface import NoiseScaleCallback     # noisescale[hf]
    from noisescale.integrations.tensorboard import NoiseScaleWriter       # noisescale[tensorboard]

Every integration logs the same scalars, named by :func:`estimate_scalars`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from noisescale.control.rules import OptimizerRule, apply_rule

if TYPE_CHECKING:
    from collections.abc import Iterable, MutableMapping

    from noisescale.control.controller import BatchSizeController
    from noisescale.meter import GradientNoiseScale, GroupEstimate, NoiseScaleEstimate

__all__ = ["BatchCallback", "MeterCallback", "estimate_scalars", "require"]


def require(module: str, extra: str) -> ModuleType:
    """Import an optional framework, or fail with the install command.

    Raises:
        ImportError: naming ``pip install 'noisescale[<extra>]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this noisescale integration needs {module!r}, which is not installed: "
            f"pip install 'noisescale[{extra}]'"
        ) from exc


def _part(out: dict[str, float], key: str, est: GroupEstimate | NoiseScaleEstimate) -> None:
    """B_simple only when resolved-enough to be a number; |G|^2 and tr(Sigma) always."""
    if est.b_simple is not None:
        out[f"{key}b_simple"] = est.b_simple
    out[f"{key}grad_norm_sq"] = est.grad_norm_sq
    out[f"{key}trace_sigma"] = est.trace_sigma


def estimate_scalars(
    estimate: NoiseScaleEstimate, prefix: str = "noise_scale", *, groups: bool = True
) -> dict[str, float]:
    """Flat ``{name: value}`` scalars of an estimate, for any logger.

    ``<prefix>/b_simple`` (examples; absent while |G|^2 is not positive, never a huge
    number), ``<prefix>/b_simple_low`` and ``_high`` (interval, only when resolved),
    ``<prefix>/grad_norm_sq``, ``<prefix>/trace_sigma``, ``<prefix>/resolved`` (0 or 1),
    and with ``groups`` the same three per module (``<prefix>/module/<name>/...``) and per
    optimizer parameter group (``<prefix>/param_group/<name>/...``). Under a preconditioner the
    same three and ``resolved`` of ``estimate.preconditioned`` under ``<prefix>/preconditioned/``.

    Example:
        >>> import torch
        >>> from noisescale import GradientNoiseScale
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> meter = GradientNoiseScale(model, method="microbatch")
        >>> for xb in torch.randn(2, 4, 3):
        ...     (model(xb).square().mean() / 2).backward()
        >>> meter.update(8)
        >>> scalars = estimate_scalars(meter.compute())  # one step: not resolved, so no b_simple
        >>> sorted(scalars)[:2]
        ['noise_scale/grad_norm_sq', 'noise_scale/module/model/grad_norm_sq']
    """
    out: dict[str, float] = {}
    _part(out, f"{prefix}/", estimate)
    if estimate.b_simple_ci is not None:
        out[f"{prefix}/b_simple_low"], out[f"{prefix}/b_simple_high"] = estimate.b_simple_ci
    out[f"{prefix}/resolved"] = float(estimate.resolved)
    if estimate.preconditioned is not None:
        _part(out, f"{prefix}/preconditioned/", estimate.preconditioned)
        out[f"{prefix}/preconditioned/resolved"] = float(estimate.preconditioned.resolved)
    if groups:
        for name, est in estimate.groups.items():
            _part(out, f"{prefix}/module/{name}/", est)
        for name, est in estimate.param_groups.items():
            _part(out, f"{prefix}/param_group/{name}/", est)
    return out


class MeterCallback:
    """What the framework callbacks share: their settings, folding in a step, the logged scalars.

    A mixin: the Lightning and Hugging Face callbacks call :meth:`_configure` from their
    ``__init__`` and create :attr:`meter` when training starts.
    """

    meter: GradientNoiseScale | None
    last_estimate: NoiseScaleEstimate | None

    def _configure(
        self,
        method: str | None,
        log_every_n_steps: int | None,
        prefix: str,
        log_groups: bool,
        meter_kwargs: dict[str, Any],
    ) -> None:
        """Store the settings.

        Raises:
            ValueError: if ``log_every_n_steps`` is given and below 1.
        """
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"Expected `log_every_n_steps` >= 1 but got {log_every_n_steps}")
        self.method = method
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.log_groups = log_groups
        self.meter_kwargs = meter_kwargs
        self.meter = None
        self.last_estimate = None
        self._sizes: list[int] = []  # micro-batch sizes seen since the last optimizer step

    def _fold_step(self, sizes: list[int]) -> None:
        """``meter.update`` for a step of micro-batches of these sizes (per_example counts its own)."""
        assert self.meter is not None, "the meter is created when training starts"
        if self.meter.method == "per_example":
            self.meter.update()
        else:
            self.meter.update(microbatch_sizes=sizes)

    def _log_scalars(self) -> dict[str, float]:
        """Exchange the steps so far, compute the estimate and name its scalars.

        One host synchronisation; the estimate is kept as ``last_estimate``. Under DDP a
        collective: the frameworks call it on every rank.
        """
        assert self.meter is not None, "the meter is created when training starts"
        self.meter.sync()
        self.last_estimate = self.meter.compute()
        return estimate_scalars(self.last_estimate, self.prefix, groups=self.log_groups)


class BatchCallback:
    """What the framework batch-size callbacks share: a decided change waits for its window.

    A framework closes an accumulation window when the epoch's micro-batch count is a multiple
    of its accumulation setting, so a change to ``m`` micro-batches per step starts only after a
    count that is a multiple of ``m`` (OLMo-core's batch-size scheduler waits the same way); the
    optimizer rule is applied then, with the B_simple of the decision.
    """

    controller: BatchSizeController | None
    rule: OptimizerRule | None
    _pending: tuple[int, int, float] | None  # (global batch before, after, B_simple at the decision)

    def _decide(self, examples: int, applied: int) -> None:
        """Count a step of ``examples`` (all ranks) at the ``applied`` global batch; keep a change pending."""
        controller = self.controller
        assert controller is not None, "the controller is created when training starts"
        change = controller.step(examples=examples)
        if change is not None:
            estimate = controller.last_estimate
            assert estimate is not None and estimate.b_simple is not None
            self._pending = (applied, change.batch_size, estimate.b_simple)

    def _due(self, done: int, granule: int) -> int | None:
        """The new micro-batches per step, if the pending change can start after ``done`` micro-batches."""
        if self._pending is None:
            return None
        steps = self._pending[1] // granule
        return None if done % steps else steps

    def _apply_rule(
        self, param_groups: Iterable[MutableMapping[str, Any]], schedulers: Iterable[Any]
    ) -> None:
        """Rescale the optimizer for the pending change (with a rule), which is then done."""
        assert self._pending is not None
        old, new, b_simple = self._pending
        if self.rule is not None:
            apply_rule(self.rule, param_groups, old=old, new=new, b_simple=b_simple, schedulers=schedulers)
        self._pending = None
