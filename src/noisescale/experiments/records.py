"""What one optimizer step of a built-in run did and measured: :class:`StepRecord`.

A run's ``metrics.jsonl`` holds one :meth:`StepRecord.to_dict` per step; the sweep, the
progress bars and the B_noise probe read these records.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from noisescale.meter import NoiseScaleEstimate

__all__ = ["StepRecord"]


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
        (:class:`~noisescale.meter.NoiseScaleEstimate` never gives an unresolved ratio). Under
        Adam also ``b_simple_preconditioned`` and its ``_ci``.
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
            if est.preconditioned is not None:  # Adam's: B_P = tr(P Sigma)/(G^T P G), same unit
                pre = est.preconditioned
                out.update(
                    b_simple_preconditioned=pre.b_simple,
                    b_simple_preconditioned_ci=None if pre.b_simple_ci is None else list(pre.b_simple_ci),
                )
        return out
