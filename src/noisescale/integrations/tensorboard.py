"""TensorBoard for plain training loops: write the meter's estimate as scalars.

Usage::

    from noisescale.integrations.tensorboard import NoiseScaleWriter

    writer = NoiseScaleWriter("runs/exp1")            # or NoiseScaleWriter(writer=your_summary_writer)
    for step in range(steps):
        ...                                          # backward passes
        meter.update(batch_size=B)
        optimizer.step(); optimizer.zero_grad()
        if step % 50 == 0:
            writer.write(meter.compute(), step)      # one host synchronisation

Under DDP call ``meter.sync()`` on every rank before ``meter.compute()`` (it exchanges the
steps since the last exchange); only rank 0 writes. Scalars:
:func:`noisescale.integrations.estimate_scalars`.

Requires the ``tensorboard`` extra: ``pip install 'noisescale[tensorboard]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from noisescale.distributed import is_rank_zero
from noisescale.integrations import estimate_scalars, require
from noisescale.meter import NoiseScaleEstimate

require("tensorboard", "tensorboard")
_tb = require("torch.utils.tensorboard", "tensorboard")

__all__ = ["NoiseScaleWriter"]


class NoiseScaleWriter:
    """Writes B_simple, its interval, |G|^2, tr(Sigma) (total, per module, per parameter group).

    Args:
        log_dir: event-file directory of a new ``SummaryWriter`` (ignored if ``writer`` is given).
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` to write into.
        prefix: name prefix of the scalars.
        groups: also write per module and per optimizer parameter group.
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        writer: Any = None,
        prefix: str = "noise_scale",
        groups: bool = True,
    ) -> None:
        self.rank_zero = is_rank_zero()
        self._own = writer is None and self.rank_zero
        self.writer = writer if writer is not None or not self.rank_zero else _tb.SummaryWriter(log_dir)
        self.prefix = prefix
        self.groups = groups

    def write(self, estimate: NoiseScaleEstimate, step: int) -> dict[str, float]:
        """Write one estimate at ``step`` (optimizer steps, or examples: your x axis).

        Returns:
            The scalars written (empty on ranks other than 0).
        """
        if not self.rank_zero:
            return {}
        scalars = estimate_scalars(estimate, self.prefix, groups=self.groups)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        return scalars

    def close(self) -> None:
        """Flush, and close the writer if this object created it."""
        if self.writer is None:
            return
        self.writer.flush()
        if self._own:
            self.writer.close()
