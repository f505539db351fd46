"""Plots of a batch-size sweep: the steps-examples Pareto front and B_crit per goal.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot, no global state, no
display needed) and written atomically to the given path.

References:
    McCandlish et al. (2018), An Empirical Model of Large-Batch Training, arXiv:1812.06162,
    figures 1, 7 (Pareto fronts) and 4 (B_crit next to B_simple); Kaplan et al. (2020),
    arXiv:2001.08361, figure 10 (B_crit against the loss target).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from noisescale._format import format_batch
from noisescale.critical.predict import BCritPowerLaw, b_crit_at_loss
from noisescale.critical.report import FitReport, GoalFit, is_loss_metric
from noisescale.io import save_figure

__all__ = ["plot_b_crit_by_goal", "plot_pareto_front", "plot_report"]

GOAL_LABELS = {"train_loss": "training loss", "test_error": "test error, fraction", "loss": "loss"}


def _label(g: GoalFit) -> str:
    name = "goal" if g.goal is None else f"goal {g.goal:g}"
    if g.fit is None:
        return f"{name}: no fit"
    if g.fit.bracketed:
        return f"{name}: B_crit = {format_batch(g.fit.b_crit_fit)}"
    return f"{name}: {g.fit.bound or 'B_crit not constrained'}"


def plot_pareto_front(
    goal_fits: Sequence[GoalFit],
    path: str | Path,
    *,
    unit: str = "examples",
    extra: Sequence[tuple[float, float] | None] = (),
    extra_label: str = "",
) -> Path:
    """Steps against examples on log-log axes, with the fitted hyperbola of every goal.

    Runs that reached the goal are filled circles; censored runs are open triangles (their
    true point lies further up and to the right). Each fitted curve
    ``S = S_min (1 + B_crit/B)``, ``E = B S`` is drawn over the sweep's batch sizes (a factor
    of 4 beyond), with a star at ``(2 E_min, 2 S_min)``, the point ``B = B_crit``, when the
    sweep brackets it.

    Args:
        goal_fits: results of :func:`noisescale.critical.report.fit_sweep`.
        path: image file to write (format from the extension, e.g. ``.png``, ``.pdf``).
        unit: batch-size unit for the axis label (images, tokens, observations, examples).
        extra: per goal, in order, another run's ``(E, S)`` to draw as a diamond (or None), e.g.
            an adaptive run's examples and steps to the goal.
        extra_label: the legend entry of the diamonds.

    Returns:
        The path written.
    """
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(goal_fits))]
    for g, color in zip(goal_fits, colors, strict=True):
        pts = g.points
        examples = pts["batch_size"] * pts["steps"]
        hit = pts["reached"].to_numpy(bool)
        ax.scatter(examples[hit], pts["steps"][hit], color=color, s=22, zorder=3)
        ax.scatter(examples[~hit], pts["steps"][~hit], facecolors="none", edgecolors=color, marker="^", s=30)
        if g.fit is None:
            ax.plot([], [], color=color, label=_label(g))
            continue
        f = g.fit
        b = np.geomspace(pts["batch_size"].min() / 4, pts["batch_size"].max() * 4, 200)
        s = f.s_min * (1 + f.b_crit_fit / b)
        ax.plot(b * s, s, color=color, label=_label(g))
        if f.bracketed:
            ax.scatter([2 * f.e_min], [2 * f.s_min], color=color, marker="*", s=110, zorder=4)
    label: str | None = extra_label or None  # one legend entry for all the diamonds
    for point, color in zip(extra, colors, strict=False):
        if point is not None:
            ax.scatter(*point, color=color, marker="D", s=60, edgecolors="k", zorder=5, label=label)
            label = None
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{unit} to reach the goal, E")
    ax.set_ylabel("optimization steps to reach the goal, S")
    ax.set_title("(S/S_min - 1)(E/E_min - 1) = 1;  ★ B = B_crit,  △ censored")
    ax.legend(fontsize="small")
    path = Path(path)
    save_figure(fig, path, dpi=120)
    return path


def plot_b_crit_by_goal(
    goal_fits: Sequence[GoalFit],
    path: str | Path,
    *,
    power_law: BCritPowerLaw | None = None,
    unit: str = "examples",
    goal_label: str = "loss target",
) -> Path:
    """B_crit of every goal with its interval, next to the B_simple measured in the same runs.

    A goal the sweep does not bracket is drawn as a triangle at its bound, pointing the way
    the bound goes. B_simple is drawn as a square at the median over the runs, with a bar
    from their smallest to their largest value. Numeric goals go on a log axis; a file with a
    single unnamed goal gets one position.

    Args:
        goal_fits: results of :func:`noisescale.critical.report.fit_sweep`, goals of one metric.
        path: image file to write.
        power_law: ``B_crit(L)`` fit to draw across the goals (Kaplan et al. 2020, eq. 5.3).
        unit: batch-size unit for the axis label.
        goal_label: what the goals are, for the axis label ``goal (<goal_label>)``, e.g.
            ``"test error, fraction"``.

    Returns:
        The path written.
    """
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    levels = [g.goal for g in goal_fits if g.goal is not None and g.goal > 0]
    numeric = len(levels) == len(goal_fits)  # every goal a positive level: a log axis of goals
    xs = levels if numeric else [float(i) for i in range(len(goal_fits))]
    drawn = {"B_crit (fit, CI)": False, "B_crit bound": False}
    for x, g in zip(xs, goal_fits, strict=True):
        f = g.fit
        if f is None:
            continue
        if f.bracketed:
            lo, hi = f.b_crit_ci
            yerr = [[f.b_crit_fit - lo], [hi - f.b_crit_fit]]
            label = None if drawn["B_crit (fit, CI)"] else "B_crit (fit, CI)"
            ax.errorbar([x], [f.b_crit_fit], yerr=yerr, fmt="o", color="C0", capsize=4, label=label)
            drawn["B_crit (fit, CI)"] = True
        elif f.bound_value is not None:
            marker = "^" if ">" in (f.bound or "") else "v"
            label = None if drawn["B_crit bound"] else "B_crit bound (not bracketed)"
            ax.scatter([x], [f.bound_value], marker=marker, color="C0", facecolors="none", s=60, label=label)
            drawn["B_crit bound"] = True
    first = True
    for x, g in zip(xs, goal_fits, strict=True):
        if g.b_simple is not None:
            med, lo, hi = g.b_simple
            label = "B_simple (median, range of runs)" if first else None
            ax.errorbar(
                [x], [med], yerr=[[med - lo], [hi - med]], fmt="s", color="C1", capsize=3, label=label
            )
            first = False
    if power_law is not None and numeric and len(xs) > 1:
        loss = np.geomspace(min(xs), max(xs), 100)
        law = f"B*/L^(1/α_B): B* = {power_law.b_star:.3g}, α_B = {power_law.alpha_b:.3g}"
        ax.plot(loss, b_crit_at_loss(loss, *power_law), color="C0", ls="--", lw=1, label=law)
    if numeric:
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"goal ({goal_label})")
    else:
        ax.set_xticks(xs, ["goal" if g.goal is None else f"{g.goal:g}" for g in goal_fits])
    ax.set_yscale("log")
    ax.set_ylabel(f"batch size ({unit})")
    ax.set_title("critical batch size per goal")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    path = Path(path)
    save_figure(fig, path, dpi=120)
    return path


def plot_report(report: FitReport, folder: Path, stem: str) -> list[Path]:
    """Pareto front and B_crit per goal, one pair per metric: ``<stem>pareto[_<metric>].png``...

    The plots of the first metric, when it is a loss, carry no suffix (a sweep's ``pareto.png``
    and ``b_crit.png``); the others are named after their metric (``pareto_test_error.png``).
    """
    written: list[Path] = []
    metrics = list(dict.fromkeys(g.metric for g in report.goals))
    for i, metric in enumerate(metrics):
        goal_fits = [g for g in report.goals if g.metric == metric]
        suffix = "" if i == 0 and is_loss_metric(metric) else f"_{metric}"
        law = report.power_law if metric == report.power_law_metric else None
        written.append(plot_pareto_front(goal_fits, folder / f"{stem}pareto{suffix}.png", unit=report.unit))
        written.append(
            plot_b_crit_by_goal(
                goal_fits,
                folder / f"{stem}b_crit{suffix}.png",
                power_law=law,
                unit=report.unit,
                goal_label=GOAL_LABELS.get(metric, metric.replace("_", " ")),
            )
        )
    return written
