"""Numbers for people: batch sizes, short numbers with a k/M/G suffix, intervals.

One place for the formatting of every table, plot label and sentence of the package, so that
a batch size reads the same in ``noisescale fit``, ``noisescale sweep`` and the plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

__all__ = [
    "describe_b_simple",
    "format_batch",
    "format_bracket",
    "format_duration",
    "format_interval",
    "short_number",
]

Rounding = Literal["nearest", "down", "up"]
_ROUNDING: dict[str, Callable[[float], int]] = {"nearest": round, "down": math.floor, "up": math.ceil}


def format_batch(value: float, rounding: Rounding = "nearest") -> str:
    """A batch size for people: integers below 10^7 exactly, other values to 3 significant figures.

    Args:
        value: the number, in the batch-size unit (images, tokens, observations, examples).
        rounding: ``"nearest"``, or ``"down"``/``"up"`` so that a lower/upper bound stays true.

    Returns:
        The formatted number.

    Raises:
        KeyError: if ``rounding`` is not one of the three.

    Examples:
        >>> format_batch(4096.0), format_batch(2873.4, "down"), format_batch(37.25), format_batch(2.5e8)
        ('4096', '2870', '37.2', '2.5e+08')
        >>> format_batch(134.00000000000003, "up"), format_batch(1.23, "up"), format_batch(112.558, "down")
        ('134', '1.23', '112')
    """
    rnd = _ROUNDING[rounding]
    value = _clean(value)  # 134.00000000000003 is 134, also rounded up
    if value == round(value) and abs(value) < 1e7:
        return f"{value:.0f}"
    exp = math.floor(math.log10(abs(value))) - 2 if value else 0
    unit = 10.0**exp
    rounded = float(rnd(_clean(value / unit)) * unit)
    if abs(rounded) >= 1e7:
        return f"{rounded:.3g}"
    return f"{rounded:.0f}" if abs(rounded) >= 100 else f"{rounded:.3g}"


def format_bracket(low: float, high: float | None) -> str:
    """``"low to high (bounds)"``: the range a batch size lies in, ends rounded outward (format_batch).

    Args:
        low: the lower end.
        high: the upper end; None or inf for none.

    Examples:
        >>> format_bracket(112.558, 134.00000000000003), format_bracket(320.0, None)
        ('112 to 134 (bounds)', '320 to inf (bounds)')
    """
    top = "inf" if high is None or math.isinf(high) else format_batch(high, "up")
    return f"{format_batch(low, 'down')} to {top} (bounds)"


def _clean(value: float) -> float:
    """``value`` without floating-point noise beyond 12 significant figures (``"up"`` adds no unit)."""
    return float(f"{value:.12g}")


def short_number(value: float) -> str:
    """Three significant figures with a k/M/G/T suffix.

    Examples:
        >>> short_number(549000), short_number(2.84e6), short_number(37.25)
        ('549k', '2.84M', '37.2')
    """
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale * 0.9995:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def format_duration(seconds: float) -> str:
    """A duration for people: seconds, minutes, hours or days with :func:`short_number`.

    Examples:
        >>> format_duration(42.0), format_duration(5400.0), format_duration(3 * 86400.0)
        ('42 s', '1.5 h', '3 d')
    """
    for scale, unit in ((86_400.0, "d"), (3_600.0, "h"), (60.0, "min")):
        if seconds >= scale:
            return f"{short_number(seconds / scale)} {unit}"
    return f"{short_number(seconds)} s"


def format_interval(low: float, high: float) -> str:
    """``[low, high]`` with :func:`short_number`.

    Examples:
        >>> format_interval(226.4, 31_900.0)
        '[226, 31.9k]'
    """
    return f"[{short_number(low)}, {short_number(high)}]"


def describe_b_simple(
    b_simple: float | None,
    ci: tuple[float, float] | None,
    unit: str,
    confidence: float = 0.95,
    *,
    name: str = "B_simple",
) -> str:
    """One line for people: B_simple (or ``name``) rounded, in its unit, with its interval, or "not resolved".

    Examples:
        >>> describe_b_simple(307.32104327359593, (250.4, 390.2), "images")
        'B_simple = 307 images [250, 390] (95%)'
        >>> describe_b_simple(1431.4, (14.84, 2109.0), "tokens"), describe_b_simple(None, None, "tokens")
        ('B_simple = 1,431 tokens [14.8, 2,109] (95%)', 'B_simple not resolved')
    """
    if b_simple is None or ci is None:
        return f"{name} not resolved"

    def n(x: float) -> str:
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"

    return f"{name} = {n(b_simple)} {unit} [{n(ci[0])}, {n(ci[1])}] ({confidence:.0%})"
