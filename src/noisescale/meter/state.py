"""The meter's additive state: the averages, the counts, and what a resumed run needs.

Shape letters: ``N`` steps folded at once, ``C`` cells, ``S`` series.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from noisescale.estimators import Accumulation, Reduction
from noisescale.meter.steps import contradicted
from noisescale.options import Averaging, Method
from noisescale.preconditioner import Preconditioner
from noisescale.smoothing import FIELDS, ema_fold, ema_init

__all__ = ["MeterState", "check_settings", "settings_of"]


@dataclass
class MeterState:
    """Everything the estimate is made of; nothing the hooks hold.

    Attributes:
        ema: ``[9, S]`` float64 averaging sums (rows: :data:`noisescale.smoothing.FIELDS`).
        steps: steps folded in since the last reset (skipped ones included).
        examples: examples in them.
        skipped: 0-d int64 on the device: steps skipped for non-finite gradients.
        contradicted: ``[S]`` int64 on the device: steps whose records were impossible for a
            mean of the small batches, per series.
    """

    ema: torch.Tensor
    steps: int
    examples: int
    skipped: torch.Tensor
    contradicted: torch.Tensor

    @classmethod
    def empty(cls, n_series: int, device: torch.device) -> MeterState:
        """No step yet."""
        return cls(
            ema=ema_init(n_series, device),
            steps=0,
            examples=0,
            skipped=torch.zeros((), dtype=torch.int64, device=device),
            contradicted=torch.zeros(n_series, dtype=torch.int64, device=device),
        )

    def fold(
        self,
        rows: torch.Tensor,
        examples: Sequence[int],
        series: torch.Tensor,
        averaging: Averaging,
        rtol: float,
    ) -> None:
        """Fold in ``N`` steps, oldest first, without a host synchronisation.

        Args:
            rows: ``[N, 4, C]`` the steps' rows per cell (:data:`noisescale.estimators.COEFFICIENT_ROWS`).
            examples: ``[N]`` examples per step (they set the decay of ``ema_examples``).
            series: ``[S, C]`` 0/1 sums of cells into series.
            averaging: the decay per step.
            rtol: tolerance of the consistency check (:func:`noisescale.meter.steps.contradicted`).
        """
        per_series = rows[:, :2] @ series.T  # [N, 2, S]
        betas = [averaging.decay(examples=e) for e in examples]
        self.ema, finite = ema_fold(self.ema, per_series, betas)
        self.skipped += (~finite).sum()
        bad = contradicted(rows, rtol).to(torch.float64) @ series.T  # [N, S]: bad cells per series
        self.contradicted += (bad > 0).sum(0)
        self.steps += len(examples)
        self.examples += sum(examples)

    def state_dict(self, group_names: list[str], param_group_names: list[str]) -> dict[str, Any]:
        """The saved form (the pre-reshape keys, plus ``contradicted_steps``)."""
        return {
            "ema": {k: v.clone() for k, v in zip(FIELDS, self.ema, strict=True)},
            "steps": self.steps,
            "examples": self.examples,
            "skipped_steps": self.skipped.clone(),
            "contradicted_steps": self.contradicted.clone(),
            "group_names": list(group_names),
            "param_group_names": list(param_group_names),
        }

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], device: torch.device) -> MeterState:
        """Load :meth:`state_dict` output (one saved before ``contradicted_steps`` existed: zeros)."""
        ema = torch.stack([torch.as_tensor(state_dict["ema"][k]) for k in FIELDS]).to(device)
        saved = state_dict.get("contradicted_steps")
        contradicted = (
            torch.zeros(ema.shape[1], dtype=torch.int64) if saved is None else torch.as_tensor(saved)
        )
        return cls(
            ema=ema,
            steps=int(state_dict["steps"]),
            examples=int(state_dict["examples"]),
            skipped=torch.as_tensor(state_dict["skipped_steps"]).to(device),
            contradicted=contradicted.to(device=device, dtype=torch.int64),
        )


class _Measuring(Protocol):
    """What :func:`settings_of` reads of a meter."""

    method: Method
    reduction: Reduction
    accumulation: Accumulation
    dataset_size: int | None
    averaging: Averaging
    preconditioner: Preconditioner | None


def settings_of(meter: _Measuring) -> dict[str, Any]:
    """What a meter's averages depend on, as saved in its state_dict (``settings``).

    Read when saved or loaded, not at construction: integrations set the loss conventions
    once they see the first batch (the Hugging Face callback's token-normalised loss).
    """
    keys = ("method", "reduction", "accumulation", "dataset_size")
    kind = None if meter.preconditioner is None else meter.preconditioner.kind
    return {k: getattr(meter, k) for k in keys} | asdict(meter.averaging) | {"preconditioner": kind}


def check_settings(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> None:
    """Refuse to resume a state measured differently from this meter.

    Args:
        saved: the ``settings`` of a :meth:`GradientNoiseScale.state_dict` (empty for states saved before
            settings were recorded, which load as before).
        mine: this meter's settings (method, loss conventions, ``dataset_size``, averaging,
            the preconditioner's kind: None, ``"adam"`` or ``"mapping"``).

    Raises:
        ValueError: naming the first setting that differs: averaging steps measured under two settings
            (say with and without the finite-population correction) would give a number of neither.
    """
    for key, value in mine.items():
        if key in saved and saved[key] != value:
            raise ValueError(
                f"state_dict was saved with {key}={saved[key]!r} but this meter has {key}={value!r}: "
                "create the meter with the settings it was saved with"
            )
