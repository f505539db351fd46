"""``noisescale measure --b-noise``: B_noise (eq. 2.8) at a training run's weights every N steps.

A probe draws ``batches`` fresh batches of the run's batch size from the task, with its own
generator (the run's data stream and weights are untouched), and runs
:func:`noisescale.estimate_b_noise` on them at the current weights: B_noise, eps_max and the
B_simple of the same batches, with 95% intervals from the spread over those batches. It runs
every ``every`` steps and after the last step, so the final probe is at the final weights, next
to the meter's final B_simple (which averages over the steps before it instead). A probe of
``M`` batches costs about ``M`` times 3-4 training steps (docs/benchmarks.md).

The probe sees the model through :func:`noisescale.experiments.training.train`'s ``stop`` hook,
which it never uses to stop the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from noisescale.b_noise import BNoiseEstimate, estimate_b_noise
from noisescale.experiments.records import StepRecord
from noisescale.experiments.tasks import Task
from noisescale.experiments.training import Trainer

__all__ = ["BNoiseProbe"]

_SEED_OFFSET = 1_000_003  # the probe's data stream differs from the run's of the same seed


@dataclasses.dataclass
class BNoiseProbe:
    """Probes B_noise every ``every`` steps and after the last one; keeps the estimates by step.

    Args:
        task: the run's task (the probe draws its batches from it).
        batch_size: units per probe batch (the run's batch size), in the task's unit.
        microbatches: k >= 3 micro-batches per probe batch.
        batches: batches per probe (30 or more for an interval worth reading).
        every: steps between probes.
        last_step: the run's last step (probed too).
        seed: the run's seed; the probe's generator is seeded from it.
    """

    task: Task
    batch_size: int
    microbatches: int
    batches: int
    every: int
    last_step: int
    seed: int = 0
    estimates: dict[int, BNoiseEstimate] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the settings; the messages name the option to change."""
        for name, value in (("--b-noise-batches", self.batches), ("--b-noise-every", self.every)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        per = self.task.units_per_example
        if self.batch_size // per < self.microbatches:
            raise ValueError(
                f"--b-noise splits each batch into {self.microbatches} micro-batches: the batch size "
                f"{self.batch_size} is too small (use --batch-size {self.microbatches * per} or more)"
            )
        self._generator = torch.Generator().manual_seed(self.seed + _SEED_OFFSET)

    def __call__(self, record: StepRecord, trainer: Trainer) -> bool:
        """The ``stop`` hook of :func:`~noisescale.experiments.training.train`: probe when due; never stop."""
        if record.step % self.every == 0 or record.step == self.last_step:
            self.estimates[record.step] = self.probe(trainer.model)
        return False

    def probe(self, model: nn.Module) -> BNoiseEstimate:
        """B_noise of ``model`` at its current weights over ``batches`` fresh batches (in the task's unit)."""
        rows = self.batch_size // self.task.units_per_example  # examples (windows of T tokens)
        data = (self.task.sample_batch(rows, self._generator) for _ in range(self.batches))
        with sdpa_kernel(SDPBackend.MATH):  # torch's fused attention kernels have no double backward
            return estimate_b_noise(
                model, self.task.loss_fn, data, microbatches=self.microbatches,
                units_per_example=self.task.units_per_example,
            )  # fmt: skip

    def final(self) -> BNoiseEstimate | None:
        """The estimate at the last step probed, or None before any probe."""
        return self.estimates[max(self.estimates)] if self.estimates else None

    def summary(self, truth: dict[str, float] | None) -> dict[str, Any]:
        """summary.json's B_noise keys: the final probe's values, its settings, and (oracle) the truth."""
        est = self.final()
        out: dict[str, Any] = {
            "b_noise": None if est is None else est.b_noise,
            "b_noise_ci": None if est is None or est.b_noise_ci is None else list(est.b_noise_ci),
            "b_noise_reason": None if est is None else est.reason,
            "eps_max": None if est is None else est.eps_max,
            "b_noise_probe": None if est is None else est.to_dict(),
            "b_noise_every": self.every,
            "b_noise_batches": self.batches,
        }
        if truth is not None:
            ci = out["b_noise_ci"]
            out["eps_max_true"] = truth["eps_max"]
            out["b_noise_ci_contains_true"] = None if ci is None else bool(ci[0] <= truth["b_noise"] <= ci[1])
        return out

    def record_fields(self, step: int) -> dict[str, Any]:
        """metrics.jsonl fields of a probed step (empty for the others)."""
        est = self.estimates.get(step)
        if est is None:
            return {}
        return {
            "b_noise": est.b_noise,
            "b_noise_ci": None if est.b_noise_ci is None else list(est.b_noise_ci),
            "eps_max": est.eps_max,
            "g_h_g": est.g_h_g,
            "trace_h_sigma": est.trace_h_sigma,
        }
