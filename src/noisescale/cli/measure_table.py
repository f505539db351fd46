"""The table ``noisescale measure`` prints from a run's summary (``summary.json``'s keys).

Every batch size carries the task's unit; a value that is not resolved says so.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

__all__ = ["fmt", "measure_table"]


def fmt(x: float | None, missing: str = "n/a") -> str:
    """Four significant digits, or ``missing`` for None/NaN."""
    if x is None or x != x:
        return missing
    return f"{x:.4g}"


def _batch_text(summary: dict[str, Any]) -> str:
    """``128 images in 1 micro-batch(es)``, or an adaptive run's ``32 -> 256 images (3 changes)``."""
    unit, schedule = summary["unit"], summary.get("batch_schedule")
    if schedule is None:
        return f"{summary['batch_size']} {unit} in {summary['microbatches']} micro-batch(es)"
    changes = len(schedule) - 1
    return (
        f"{schedule[0]['batch_size']} -> {schedule[-1]['batch_size']} {unit} ({changes} change(s), adaptive)"
    )


def _lr_text(summary: dict[str, Any]) -> str:
    """``0.1 (sgd)``, or an adaptive run's ``0.1 -> 0.266 (sgd, rescaled with the batch)``."""
    schedule = summary.get("batch_schedule")
    if schedule is None:
        return f"{fmt(summary['lr'])} ({summary['optimizer']})"
    final = fmt(schedule[-1]["lr"])
    return f"{fmt(summary['lr'])} -> {final} ({summary['optimizer']}, rescaled with the batch)"


def _interval(b: float | None, ci: list[float] | None, unit: str, summary: dict[str, Any]) -> str:
    """``1082 images  [826.2, 1568] (95%)``, or "not resolved"."""
    if b is None or ci is None:
        return "not resolved"
    return f"{fmt(b)} {unit}  [{fmt(ci[0])}, {fmt(ci[1])}] ({summary['confidence']:.0%})"


def measure_table(summary: dict[str, Any]) -> Table:
    """The final table; an unresolved B_simple reads "not resolved", never a number."""
    unit = summary["unit"]
    table = Table(title=f"noise scale: {summary['task']} ({summary['method']})", show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    b = summary["b_simple"] if summary["resolved"] else None
    b_text = _interval(b, summary["b_simple_ci"], unit, summary)
    mean = summary["b_simple_run_mean"]
    run_mean = "not resolved" if mean is None else f"{fmt(mean)} {unit} ({summary['resolved_steps']} steps)"
    rows = [
        ("B_simple", b_text),
        ("B_simple, run mean", run_mean),
    ]
    pre = summary["preconditioned"]
    if pre is not None:  # under Adam: the preconditioned noise scale, next to the raw one
        pre_text = _interval(pre["b_simple"], pre["b_simple_ci"], unit, summary)
        rows.append(("B_simple, preconditioned", pre_text))
    rows += [("|G|^2", fmt(summary["grad_norm_sq"])), ("tr Sigma", fmt(summary["trace_sigma"]))]
    if "mean_return" in summary:  # an RL task: its groups (policy, value) and its returns
        rows += _rl_rows(summary, unit)
    else:
        rows.append(("loss (train)", fmt(summary["loss"])))
        rows.append((f"loss ({summary['held_out']})", fmt(summary["test_loss"])))
    if summary.get("test_bpc") is not None:
        rows.append((f"bits per character ({summary['held_out']})", fmt(summary["test_bpc"])))
    if summary.get("test_error") is not None:
        rows.append(("error (test)", f"{summary['test_error']:.2%}"))
    rows += [
        ("learning rate", _lr_text(summary)),
        ("batch size", _batch_text(summary)),
        ("temperature lr/B", fmt(summary["temperature"])),
    ]
    if "flops_per_example" in summary:
        flops = f"{summary['flops_per_example']:.3g} (forward + backward)"
        rows.append((f"FLOPs per {unit.removesuffix('s')}", flops))
    rows += [
        ("resolved", "yes" if summary["resolved"] else "no"),
        ("skipped steps (non-finite)", str(summary["skipped_steps"])),
        (f"steps / {unit}", f"{summary['steps']} / {summary['examples']}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
    if "b_simple_true" in summary:
        rows += [
            ("B_simple (true)", fmt(summary["b_simple_true"])),
            ("B_noise (true)", fmt(summary["b_noise_true"])),
            ("interval contains true", {True: "yes", False: "no", None: "n/a"}[summary["ci_contains_true"]]),
        ]
    if "b_noise_probe" in summary:
        rows += _b_noise_rows(summary, unit)
    for row in rows:
        table.add_row(*row)
    return table


def _rl_rows(summary: dict[str, Any], unit: str) -> list[tuple[str, str]]:
    """Each group's B_simple, final and run mean, then the mean return and the episodes."""
    rows = []
    for name, g in summary["groups"].items():
        rows.append((f"B_simple, {name}", _interval(g["b_simple"], g["b_simple_ci"], unit, summary)))
        mean = summary["group_run_means"][name]
        text = "not resolved" if mean["b_simple"] is None else f"{fmt(mean['b_simple'])} {unit}"
        rows.append((f"B_simple, {name}, run mean", f"{text} ({mean['resolved_steps']} steps)"))
    window = f"mean return (last {summary['return_window']} episodes)"
    return [*rows, (window, fmt(summary["mean_return"])), ("episodes", str(summary["episodes"]))]


def _b_noise_rows(summary: dict[str, Any], unit: str) -> list[tuple[str, str]]:
    """B_noise and eps_max of the last probe, or why B_noise is not resolved."""
    probe, ci = summary["b_noise_probe"], summary["b_noise_ci"]
    if summary["b_noise"] is None or ci is None:
        b_noise = f"not resolved: {summary['b_noise_reason']}"
    else:
        b_noise = f"{fmt(summary['b_noise'])} {unit}  [{fmt(ci[0])}, {fmt(ci[1])}] (95%)"
    rows = [
        (f"B_noise (probe, {probe['batches']} batches)", b_noise),
        ("eps_max |G|^2/G^T H G", fmt(summary["eps_max"], "not resolved")),
    ]
    if "eps_max_true" in summary:
        contains = summary["b_noise_ci_contains_true"]
        rows += [
            ("eps_max (true)", fmt(summary["eps_max_true"])),
            ("B_noise interval contains true", {True: "yes", False: "no", None: "n/a"}[contains]),
        ]
    return rows
