"""``BatchSizeController``: grows the batch as the measured noise scale grows, in any training loop.

Fed by a :class:`~noisescale.GradientNoiseScale`, it looks at the estimate every ``check_every``
optimizer steps (one host synchronisation, the meter's ``compute()``) and decides the next
global batch with :func:`noisescale.control.policy.decide` (targets, integer factors, interval,
hysteresis: see there). With an optimizer and a rule (:mod:`noisescale.control.rules`) it rescales
the learning rate and the other hyperparameters at each change.

Applying the batch (your loop reads two numbers every step):

- gradient accumulation: micro-batches of a fixed ``micro_batch_size`` on each rank,
  ``controller.micro_batches`` of them per step (``batch_size / (micro_batch_size x world_size)``);
- or the loader's batch size: ``controller.per_rank_batch_size`` examples per step on each rank,
  one backward pass (use ``micro_batch_size`` as the smallest per-rank step).

Under DDP every rank holds a controller over the same meter settings and calls :meth:`step` at
every step: the meter's estimate is the same on every rank (it covers the steps exchanged so far),
and the decision is a pure function of it and of the controller's state, so every rank decides
the same (tested with 2 gloo processes). Checkpoint :meth:`state_dict` with the meter's and the
optimizer's: a resumed run makes exactly the decisions of an uninterrupted one (tested).

References:
    McCandlish et al. (2018), arXiv:1812.06162, section 2.3 and appendix D (adaptive batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch

from noisescale.control.policy import BatchSizePolicy, ControllerState, decide
from noisescale.control.rules import OptimizerRule, apply_rule, check_rule
from noisescale.meter import GradientNoiseScale, NoiseScaleEstimate
from noisescale.meter.steps import check_count

__all__ = ["BatchChange", "BatchSizeController"]


class BatchChange(NamedTuple):
    """One entry of the batch schedule: from this step on, this batch.

    ``step``: optimizer steps done before the change; ``examples``: examples seen then;
    ``batch_size``: the new global batch, examples; ``lr``: the first param group's learning rate
    after the change (None without an optimizer).
    """

    step: int
    examples: int
    batch_size: int
    lr: float | None

    def to_dict(self) -> dict[str, Any]:
        """``{"step", "examples", "batch_size", "lr"}``."""
        return self._asdict()


class BatchSizeController:
    """Decide the global batch size from the meter's B_simple, and rescale the optimizer with it.

    Usage (a plain loop; DDP the same on every rank)::

        meter = GradientNoiseScale(model, method="microbatch")
        controller = BatchSizeController(meter, batch_size=64, micro_batch_size=32, max_batch_size=4096,
                                         optimizer=opt, rule=SGDRule())
        for step in range(steps):
            for xb, yb in next_microbatches(controller.micro_batches):   # micro_batch_size each
                (loss_fn(model(xb), yb) / controller.micro_batches).backward()
            meter.update(batch_size=controller.per_rank_batch_size)
            opt.step(); opt.zero_grad()
            controller.step()                 # may change controller.batch_size and opt's lr

    Args:
        meter: the noise-scale meter of this run.
        batch_size: the initial global batch B0, examples (all ranks).
        micro_batch_size: examples per backward pass on one rank.
        world_size: data-parallel ranks (default: the meter's).
        max_batch_size: the largest global batch, examples (None: no limit).
        min_batch_size: the smallest (default B0, or one micro-batch per rank with ``allow_decrease``).
        critical_factor: track ``B = c B_simple`` (the default, c = 1).
        exchange_rate: track ``B = sqrt(r B_simple)`` instead (r in examples per step).
        hysteresis: margin the interval's bound must clear (default 10%).
        min_examples_between: examples between two changes.
        allow_decrease: also shrink the batch (off: the batch never decreases).
        check_every: optimizer steps between looks at the estimate (each one host sync).
        optimizer: rescaled at each change by ``rule`` (both or neither).
        rule: :class:`~noisescale.control.rules.SGDRule` or :class:`~noisescale.control.rules.AdamRule`.
        schedulers: LR schedulers of ``optimizer`` whose base learning rates follow the rule.

    Raises:
        ValueError: before training, for invalid settings
            (:class:`~noisescale.control.policy.BatchSizePolicy`), an optimizer without a rule or the
            reverse, or an Adam rule whose betas the largest batch would push below 0.
    """

    def __init__(
        self,
        meter: GradientNoiseScale,
        *,
        batch_size: int,
        micro_batch_size: int,
        world_size: int | None = None,
        max_batch_size: int | None = None,
        min_batch_size: int | None = None,
        critical_factor: float | None = None,
        exchange_rate: float | None = None,
        hysteresis: float = 0.1,
        min_examples_between: int = 0,
        allow_decrease: bool = False,
        check_every: int = 10,
        optimizer: torch.optim.Optimizer | None = None,
        rule: OptimizerRule | None = None,
        schedulers: Iterable[Any] = (),
    ) -> None:
        self.policy = BatchSizePolicy(
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
            world_size=meter.world_size if world_size is None else world_size,
            max_batch_size=max_batch_size,
            min_batch_size=min_batch_size,
            critical_factor=critical_factor,
            exchange_rate=exchange_rate,
            hysteresis=hysteresis,
            min_examples_between=min_examples_between,
            allow_decrease=allow_decrease,
        )
        check_count("check_every", check_every, "optimizer steps")
        if (optimizer is None) != (rule is None):
            raise ValueError("give both `optimizer` and `rule` (SGDRule() or AdamRule()) or neither")
        if optimizer is not None and rule is not None:
            check_rule(rule, optimizer, batch_size=batch_size, max_batch_size=max_batch_size)
        self.meter = meter
        self.check_every = int(check_every)
        self.optimizer = optimizer
        self.rule = rule
        self.schedulers = list(schedulers)
        self.last_estimate: NoiseScaleEstimate | None = None
        self._state = ControllerState.initial(self.policy)
        self._schedule = [BatchChange(0, 0, batch_size, self._lr())]

    # -- what the loop reads ----------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """The global batch of the next step, examples."""
        return self._state.batch_size

    @property
    def per_rank_batch_size(self) -> int:
        """Examples of the next step on one rank."""
        return self._state.batch_size // self.policy.world_size

    @property
    def micro_batches(self) -> int:
        """Backward passes of ``micro_batch_size`` examples per rank in the next step."""
        return self._state.batch_size // self.policy.granule

    @property
    def steps(self) -> int:
        """Optimizer steps counted so far."""
        return self._state.steps

    @property
    def examples(self) -> int:
        """Examples seen so far (all ranks)."""
        return self._state.examples

    @property
    def schedule(self) -> list[BatchChange]:
        """Every batch so far, starting with the initial one."""
        return list(self._schedule)

    # -- the step -------------------------------------------------------------------------------
    def _lr(self) -> float | None:
        return None if self.optimizer is None else float(self.optimizer.param_groups[0]["lr"])

    def step(self, examples: int | None = None) -> BatchChange | None:
        """Count one optimizer step; every ``check_every`` steps, decide the batch.

        Call it after ``optimizer.step()`` (and before an examples-keyed ``scheduler.step()``).

        Args:
            examples: examples of this step, all ranks (default: :attr:`batch_size`).

        Returns:
            The change, or None.
        """
        seen = self._state.batch_size if examples is None else examples
        check_count("examples", seen)
        self._state = self._state._replace(steps=self._state.steps + 1, examples=self._state.examples + seen)
        if self._state.steps % self.check_every:
            return None
        self.last_estimate = estimate = self.meter.compute()
        ci = estimate.b_simple_ci if estimate.resolved else None
        new = decide(self.policy, self._state, ci)
        if new is self._state:
            return None
        old = self._state.batch_size
        self._state = new
        assert estimate.b_simple is not None, "a change needs a resolved estimate"
        if self.optimizer is not None and self.rule is not None:
            apply_rule(
                self.rule,
                self.optimizer.param_groups,
                old=old,
                new=new.batch_size,
                b_simple=estimate.b_simple,
                schedulers=self.schedulers,
            )
        change = BatchChange(new.steps, new.examples, new.batch_size, self._lr())
        self._schedule.append(change)
        return change

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The decisions' state, the schedule so far and the settings (plain Python: ``torch.save``-able)."""
        return {
            "state": self._state._asdict(),
            "schedule": [c.to_dict() for c in self._schedule],
            "policy": dataclasses.asdict(self.policy),
            "check_every": self.check_every,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next decisions are those of the uninterrupted run.

        Restore the meter's and the optimizer's state dicts too (the optimizer's holds the
        rescaled learning rate and betas).

        Raises:
            ValueError: if it was saved with other settings (naming them).
        """
        saved = {**state_dict["policy"], "check_every": state_dict["check_every"]}
        mine = {**dataclasses.asdict(self.policy), "check_every": self.check_every}
        differ = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if differ:
            listed = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(
                f"this controller state was saved with other settings ({listed}): use the same ones"
            )
        self._state = ControllerState(**state_dict["state"])
        self._schedule = [BatchChange(**c) for c in state_dict["schedule"]]
