r"""What the meter's steps fold into, and the estimate :meth:`GradientNoiseScale.compute` makes of it.

A step's rows are per *cell* (:mod:`noisescale.meter.partition`): each measured parameter's
recorded squared norm sums into its cell (:meth:`Averages.cells_of`), the estimators
(:mod:`noisescale.meter.steps`, :mod:`noisescale.meter.exchange`) make ``[4, C]`` rows of them,
and the series (groups, optimizer groups, total) sum cells.

Under a diagonal preconditioner ``P`` (:mod:`noisescale.preconditioner`) every squared norm is
recorded twice, plain and weighted (``|g|_P^2 = sum_j P_j g_j^2``), so the cells are doubled:
the ``C`` plain ones, then ``C`` weighted ones, through the very same estimators, DDP exchange
and consistency check. Here the rows split again: the plain half folds into the raw series,
the weighted half into a second :class:`~noisescale.meter.state.MeterState` whose one series
sums every weighted cell, giving :math:`G^T P G`, :math:`\mathrm{tr}(P\Sigma)` and
:math:`B_P = \mathrm{tr}(P\Sigma)/(G^T P G)` with the same averaging, interval and "resolved"
rule: ``estimate.preconditioned``, a :class:`~noisescale.meter.results.NoiseScaleEstimate`
without groups. Averaged apart, a step whose weighted rows are not finite (no Adam state yet:
NaN weights) is skipped in the preconditioned series only (its ``skipped_steps``).

Shape letters: ``P`` measured parameters, ``C`` cells, ``S`` series, ``N`` steps folded at once.

References:
    McCandlish et al. (2018), arXiv:1812.06162, eq. (2.9), appendix A.1.
    Qiao et al. (2021), Pollux, OSDI, arXiv:2008.12260 (the preconditioned noise scale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from noisescale.estimators import contradiction_rtol
from noisescale.meter.partition import Partition
from noisescale.meter.results import NoiseScaleEstimate, noise_scale_estimate
from noisescale.meter.state import MeterState
from noisescale.options import Averaging
from noisescale.uncertainty import BSimpleInterval, b_simple_interval

__all__ = ["MAX_PENDING", "Averages"]

MAX_PENDING = 32  # one process: steps whose rows are kept before they are folded in


class Averages:
    """The raw series' averages and, under a preconditioner, the preconditioned total's.

    Args:
        part: the meter's cells and series; the sums live on the first parameter's device.
        preconditioned: whether the rows carry ``C`` weighted cells after the plain ones.
    """

    def __init__(self, part: Partition, *, preconditioned: bool) -> None:
        self.group_names = part.group_names
        self.param_group_names = part.param_group_names
        params = [p for ps in part.cells for p in ps]
        device = params[0].device
        self.rtol = max(contradiction_rtol(p.dtype) for p in params)  # of the consistency check
        self.cells = len(part.cells)
        self.series = part.series.to(device)  # [S, C]
        cell = torch.tensor([j for j, ps in enumerate(part.cells) for _ in ps], device=device)
        self._param_cells = torch.nn.functional.one_hot(cell, self.cells).to(torch.float64)  # [P, C]
        self._total = torch.ones(1, self.cells, dtype=torch.float64, device=device)  # the weighted cells' sum
        self._device = device
        self.preconditioned = preconditioned
        self.raw = MeterState.empty(self.series.shape[0], device)
        self.weighted: MeterState | None = None
        self._pending: list[tuple[torch.Tensor, int]] = []  # one process: each step's [4, C] rows, examples
        self.reset()

    def cells_of(self, norms: torch.Tensor) -> torch.Tensor:
        """``[k, P]`` squared norms per parameter -> ``[k, C]`` per cell (``[k, 2 P]`` -> ``[k, 2 C]``).

        The plain and the weighted halves are summed apart: a NaN weighted norm (no Adam state
        yet) must not reach a plain cell through a zero of a matrix product.
        """
        if not self.preconditioned:
            return norms @ self._param_cells
        plain, weighted = norms.chunk(2, dim=1)
        return torch.cat([plain @ self._param_cells, weighted @ self._param_cells], 1)

    def reset(self) -> None:
        """No step yet."""
        self._pending = []
        self.raw = MeterState.empty(self.series.shape[0], self._device)
        self.weighted = MeterState.empty(1, self._device) if self.preconditioned else None

    def add(self, rows: torch.Tensor, examples: int, averaging: Averaging) -> None:
        """Keep one step's ``[4, C]`` rows (one process); fold them in once :data:`MAX_PENDING` wait."""
        self._pending.append((rows, examples))
        if len(self._pending) >= MAX_PENDING:
            self.settle(averaging)

    def drop_pending(self) -> None:
        """Forget the steps :meth:`add` kept."""
        self._pending = []

    def settle(self, averaging: Averaging) -> None:
        """Fold in the steps :meth:`add` kept, in order, at once."""
        pending, self._pending = self._pending, []
        if pending:
            self.fold(torch.stack([r for r, _ in pending]), [e for _, e in pending], averaging)

    def fold(self, rows: torch.Tensor, examples: Sequence[int], averaging: Averaging) -> None:
        """Fold in ``N`` steps' ``[N, 4, C]`` (``[N, 4, 2 C]``) rows, oldest first, without a host sync."""
        self.raw.fold(rows[..., : self.cells], examples, self.series, averaging, self.rtol)
        if self.weighted is not None:
            self.weighted.fold(rows[..., self.cells :], examples, self._total, averaging, self.rtol)

    def state_dict(self) -> dict[str, Any]:
        """The raw state's saved form; under a preconditioner its state under ``"preconditioned"``."""
        state = self.raw.state_dict(self.group_names, self.param_group_names)
        if self.weighted is not None:
            state["preconditioned"] = self.weighted.state_dict([], [])
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: if it was saved for other groups, or with a preconditioner and this
                meter has none (or the other way round).
        """
        for key, mine in (("group_names", self.group_names), ("param_group_names", self.param_group_names)):
            theirs = list(state_dict.get(key, []))
            if theirs != mine:
                raise ValueError(f"state_dict was saved for {key} {theirs} but this meter has {mine}")
        saved = state_dict.get("preconditioned")
        if (saved is None) != (self.weighted is None):
            had, has = ("no", "a") if saved is None else ("a", "no")
            raise ValueError(
                f"state_dict was saved by a meter with {had} preconditioner but this meter has {has} "
                "preconditioner: create the meter with the preconditioner it was saved with"
            )
        self.raw = MeterState.from_state_dict(state_dict, self._device)
        self.weighted = None if saved is None else MeterState.from_state_dict(saved, self._device)

    def estimate(self, confidence: float) -> NoiseScaleEstimate:
        """The raw estimate, with ``preconditioned`` set under a preconditioner (one interval computation)."""
        states = [self.raw] if self.weighted is None else [self.raw, self.weighted]
        iv = b_simple_interval(torch.cat([s.ema for s in states], 1), confidence)
        contradicted = torch.cat([s.contradicted for s in states]).tolist()
        n = self.series.shape[0]
        raw = self._estimate(
            self.raw, _series(iv, slice(0, n)), contradicted[:n], self.group_names, self.param_group_names
        )
        if self.weighted is None:
            return raw
        return raw._replace(
            preconditioned=self._estimate(
                self.weighted, _series(iv, slice(n, n + 1)), contradicted[n:], [], []
            )
        )

    def _estimate(
        self,
        state: MeterState,
        iv: BSimpleInterval,
        contradicted: list[int],
        group_names: list[str],
        param_group_names: list[str],
    ) -> NoiseScaleEstimate:
        return noise_scale_estimate(
            iv,
            contradicted,
            group_names=group_names,
            param_group_names=param_group_names,
            steps=state.steps,
            examples=state.examples,
            skipped_steps=int(state.skipped),
            rtol=self.rtol,
        )


def _series(iv: BSimpleInterval, part: slice) -> BSimpleInterval:
    """The series ``part`` of an interval."""
    return BSimpleInterval(*(field[part] for field in iv))
