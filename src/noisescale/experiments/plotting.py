"""The run figures: ``noise_scale.png``, ``branch.png`` and, for an adaptive run, ``batch_size.png``.

``noise_scale.png`` draws B_simple with its interval, and the loss, against examples seen;
``branch.png`` the B_crit of branched training next to B_simple along the base run;
``batch_size.png`` an adaptive run's batch against examples seen, next to B_simple.

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

__all__ = ["plot_batch_schedule", "plot_branch", "plot_run"]


class _PlainLogFormatter(ticker.LogFormatterSciNotation):
    """Matplotlib's choice of which log ticks to label, printed as plain numbers (20, not 2x10^1)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _log_axis(ax: Axes) -> None:
    """Log y axis with plain tick labels."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter())
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))


def _finish(ax: Axes, ylabel: str, *, xlabel: str | None = None) -> None:
    """Axis labels, the legend and a light grid."""
    ax.set_ylabel(ylabel)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.legend(loc="best", fontsize="small")
    ax.grid(True, which="both", alpha=0.3)


def _save(fig: Figure, path: str | Path, title: str) -> None:
    """Title the figure (if any) and save it atomically."""
    if title:
        fig.suptitle(title)
    save_figure(fig, path, dpi=110)


def _draw_b_simple(
    ax: Axes, records: Sequence[Mapping[str, Any]], label: str, confidence: float
) -> np.ndarray:
    """B_simple with its interval against examples; returns it, NaN where not resolved."""
    examples, b_simple = _column(records, "examples"), _column(records, "b_simple")
    cis = [r.get("b_simple_ci") or (None, None) for r in records]
    low = np.array([np.nan if c[0] is None else c[0] for c in cis], dtype=np.float64)
    high = np.array([np.nan if c[1] is None else c[1] for c in cis], dtype=np.float64)
    ok = np.isfinite(b_simple) & (b_simple > 0)
    band = ok & np.isfinite(low) & np.isfinite(high) & (low > 0)
    ax.fill_between(
        examples,
        np.where(band, low, np.nan),
        np.where(band, high, np.nan),
        alpha=0.25,
        color="C0",
        linewidth=0,
        label=f"{confidence:.0%} interval",
    )
    shown = np.where(ok, b_simple, np.nan)
    ax.plot(examples, shown, color="C0", label=label)
    return shown


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
    metric: str = "loss",
    metric_label: str = "batch loss",
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
        metric: the record key of the lower panel (``"loss"``; ``"mean_return"`` for an RL task).
        metric_label: its label (the axis says "training loss" for the loss).
    """
    examples = _column(records, "examples")
    loss = _column(records, metric)
    fig = Figure(figsize=(7.0, 6.0), layout="constrained")
    ax_b, ax_l = fig.subplots(2, 1, sharex=True)
    ok = np.isfinite(_draw_b_simple(ax_b, records, "B_simple (EMA)", confidence))
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
    _finish(ax_b, f"B_simple ({unit})")

    ax_l.plot(examples, loss, color="C1", alpha=0.35, linewidth=0.8, label=metric_label)
    if len(loss) >= 20:
        window = max(len(loss) // 50, 5)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax_l.plot(examples[window - 1 :], smooth, color="C1", label=f"mean of {window} steps")
    if np.all(loss[np.isfinite(loss)] > 0) and np.isfinite(loss).any():
        _log_axis(ax_l)
    _finish(ax_l, "training loss" if metric == "loss" else metric_label, xlabel=f"{unit} seen")
    _save(fig, path, title)


def plot_branch(
    points: Sequence[Mapping[str, Any]],
    curve: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    unit: str = "examples",
    title: str = "",
    confidence: float = 0.95,
) -> None:
    """Draw B_crit from branched training and B_simple along the base run, and its loss; save atomically.

    Args:
        points: per branch point (``branch.json``'s ``points``): ``examples``, ``b_crit``,
            ``b_crit_ci``, ``bound`` (``"B_crit >= 512"``...), the same with the suffix
            ``_cumulative`` (from initialisation; with a bound, ``b_crit_cumulative_bracket`` is
            drawn as a line), ``b_simple``, ``b_simple_ci``, optionally
            ``truth`` with ``b_noise``.
        curve: the base run's checks: ``examples``, ``loss``, ``b_simple``, ``b_simple_ci``.
        path: output image.
        unit: unit of the batch sizes and of the x axis.
        title: figure title.
        confidence: level of the intervals, for the legend.
    """
    fig = Figure(figsize=(7.0, 6.0), layout="constrained")
    ax_b, ax_l = fig.subplots(2, 1, sharex=True)
    seen = [c for c in curve if c.get("examples")]
    x = _column(seen, "examples")
    b_simple = _draw_b_simple(ax_b, seen, "B_simple (base run)", confidence)
    px = _column(points, "examples")
    shown = [*b_simple[np.isfinite(b_simple)]]
    for suffix, style, color, label in (
        ("", "o", "C3", "B_crit over the window after the point"),
        ("_cumulative", "s-", "C2", "B_crit from initialisation (E_min/S_min)"),
    ):
        b_crit = _column(points, f"b_crit{suffix}")
        crit_ci = np.array(
            [p.get(f"b_crit{suffix}_ci") or (np.nan, np.nan) for p in points], dtype=np.float64
        ).reshape(-1, 2)
        err = np.nan_to_num(np.abs(crit_ci.T - b_crit))  # [2, points]: below and above; 0 without an interval
        ax_b.errorbar(
            px,
            b_crit,
            yerr=err,
            fmt=style,
            color=color,
            capsize=3,
            label=f"{label}, branched ({confidence:.0%})",
        )
        shown += [*b_crit[np.isfinite(b_crit)]]
        for p, xi in zip(points, px, strict=True):
            bound = p.get(f"b_crit{suffix}_bound" if suffix else "bound")
            if bound:  # "B_crit >= 512": an arrow up from 512; "B_crit <= 16": down
                value = float(bound.split()[-1])
                shown.append(value)
                ax_b.plot([xi], [value], marker="^" if ">" in bound else "v", color=color, linestyle="none")
                bracket = p.get(f"b_crit{suffix}_bracket") if suffix else None
                if bracket is not None and None not in bracket:  # from init: the range it lies in
                    ax_b.plot([xi, xi], bracket, color=color, linewidth=1)
                    shown += bracket
    truth = [(xi, (p.get("truth") or {}).get("b_noise")) for p, xi in zip(points, px, strict=True)]
    if any(t is not None for _, t in truth):
        tx = [xi for xi, t in truth if t is not None]
        ax_b.plot(tx, [t for _, t in truth if t is not None], "k--", linewidth=1, label="B_noise (true)")
    if shown:  # the band of an early, barely resolved B_simple may reach far: keep the values in view
        ax_b.set_ylim(min(shown) / 2, max(shown) * 2)
    ax_b.set_xscale("log")
    _log_axis(ax_b)
    _finish(ax_b, f"batch size ({unit})")
    ax_l.plot(x, _column(seen, "loss"), color="C1", label="training loss (fixed subset)")
    ax_l.plot(px, _column(points, "loss"), "o", color="C1", label="branch points")
    _log_axis(ax_l)
    _finish(ax_l, "training loss", xlabel=f"{unit} seen (base run)")
    _save(fig, path, title)


def plot_batch_schedule(
    records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "", unit: str = "examples"
) -> None:
    """Draw an adaptive run's batch against examples seen, with the B_simple it followed; save atomically.

    Args:
        records: per-step dicts with ``examples``, ``batch_size``, ``b_simple`` and ``b_simple_ci``,
            as in ``metrics.jsonl``.
        path: output image, e.g. ``runs/mnist/batch_size.png``.
        title: figure title.
        unit: unit of the batch sizes and of the x axis.
    """
    examples = _column(records, "examples")
    b_simple = _column(records, "b_simple")
    low = np.array([(r.get("b_simple_ci") or (np.nan,))[0] for r in records], dtype=np.float64)
    fig = Figure(figsize=(7.0, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.step(examples, _column(records, "batch_size"), where="pre", color="C2", label="batch size")
    ax.plot(examples, np.where(b_simple > 0, b_simple, np.nan), color="C0", alpha=0.6, label="B_simple (EMA)")
    ax.plot(
        examples,
        np.where(low > 0, low, np.nan),
        color="C0",
        alpha=0.6,
        linestyle=":",
        label="its lower bound",
    )
    _log_axis(ax)
    _finish(ax, f"{unit} per step", xlabel=f"{unit} seen")
    _save(fig, path, title)
