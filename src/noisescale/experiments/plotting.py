"""The run figure ``noise_scale.png``: B_simple with its interval, and the loss, against examples seen.

Steps where B_simple is not resolved are left out of the upper panel (a gap, never a
huge number). Both panels share a linear x axis in examples seen; B_simple and
the loss are on log scales, since B_simple rises by an order of magnitude or more
as the loss falls (McCandlish et al. 2018, section 3).

The figure is a :class:`matplotlib.figure.Figure` built directly: no pyplot, no backend switch,
nothing global changes (a notebook keeps its backend).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from noisescale.io import save_figure

__all__ = ["plot_run"]


class _PlainLogFormatter(ticker.LogFormatterSciNotation):
    """Matplotlib's choice of which log ticks to label, printed as plain numbers (20, not 2x10^1)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _log_axis(ax: Axes) -> None:
    """Log y axis with plain tick labels."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter())
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))


def _column(records: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """``records[i][key]`` as float64, NaN where missing or None."""
    values = [r.get(key) for r in records]
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def plot_run(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    unit: str = "examples",
    b_simple_true: float | None = None,
    confidence: float = 0.95,
) -> None:
    """Draw B_simple (with its interval) and the training loss against examples seen; save atomically.

    Args:
        records: per-step dicts with ``examples``, ``loss``, ``b_simple`` (None when not
            resolved) and ``b_simple_ci`` (``[low, high]`` or None), as in ``metrics.jsonl``;
            ``b_simple_preconditioned`` where present (under Adam) is drawn too.
        path: output image, e.g. ``runs/mnist/noise_scale.png``.
        title: figure title (task, method, batch size, learning rate).
        unit: unit of the batch sizes and of the x axis ("images", "examples", "tokens").
        b_simple_true: exact B_simple to draw as a reference line (oracle tasks), or None.
        confidence: level of the intervals, for the legend.
    """
    examples = _column(records, "examples")
    loss = _column(records, "loss")
    b_simple = _column(records, "b_simple")
    cis = [r.get("b_simple_ci") or (None, None) for r in records]
    low = np.array([np.nan if c[0] is None else c[0] for c in cis], dtype=np.float64)
    high = np.array([np.nan if c[1] is None else c[1] for c in cis], dtype=np.float64)

    fig = Figure(figsize=(7.0, 6.0), layout="constrained")
    ax_b, ax_l = fig.subplots(2, 1, sharex=True)
    ok = np.isfinite(b_simple) & (b_simple > 0)
    band = ok & np.isfinite(low) & np.isfinite(high) & (low > 0)
    ax_b.fill_between(
        examples,
        np.where(band, low, np.nan),
        np.where(band, high, np.nan),
        alpha=0.25,
        color="C0",
        linewidth=0,
        label=f"{confidence:.0%} interval",
    )
    ax_b.plot(examples, np.where(ok, b_simple, np.nan), color="C0", label="B_simple (EMA)")
    pre = _column(records, "b_simple_preconditioned")  # under Adam: B_P, the preconditioned one
    if np.isfinite(pre).any():
        label = "B_simple, preconditioned (Adam)"
        ax_b.plot(examples, np.where(pre > 0, pre, np.nan), color="C2", label=label)
        ok |= np.isfinite(pre) & (pre > 0)
    if b_simple_true is not None:
        ax_b.axhline(b_simple_true, color="k", linestyle="--", linewidth=1, label=f"true {b_simple_true:.4g}")
    if ok.any():
        _log_axis(ax_b)
    else:
        ax_b.text(0.5, 0.5, "not resolved", transform=ax_b.transAxes, ha="center", va="center")
    ax_b.set_ylabel(f"B_simple ({unit})")
    ax_b.legend(loc="best", fontsize="small")
    ax_b.grid(True, which="both", alpha=0.3)

    ax_l.plot(examples, loss, color="C1", alpha=0.35, linewidth=0.8, label="batch loss")
    if len(loss) >= 20:
        window = max(len(loss) // 50, 5)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax_l.plot(examples[window - 1 :], smooth, color="C1", label=f"mean of {window} steps")
    if np.all(loss[np.isfinite(loss)] > 0) and np.isfinite(loss).any():
        _log_axis(ax_l)
    ax_l.set_xlabel(f"{unit} seen")
    ax_l.set_ylabel("training loss")
    ax_l.legend(loc="best", fontsize="small")
    ax_l.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    save_figure(fig, path, dpi=110)
