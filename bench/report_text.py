"""How the report writes numbers: fixed decimals, shares, signed differences, ratios, ranges."""

from __future__ import annotations

import math
from collections.abc import Sequence




def as_cpu(microseconds: float, kernel_share: float) -> str:
    if math.isnan(kernel_share):
        return as_number(microseconds, 0)
    return f"{as_number(microseconds, 0)} ({kernel_share * 100:.0f} % kernel)"


def unit_decimals(unit: str) -> int:
    return 2 if unit == "ms" else 0


def percent(part: float, whole: float) -> float:
    return part / whole * 100 if whole and not math.isnan(whole) else float("nan")


def as_ratio(part: float, whole: float) -> str:
    value = part / whole if whole and not math.isnan(whole) else float("nan")
    return "n/a" if math.isnan(value) else f"{value:.2f}×"


def as_number(value: float, decimals: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{decimals}f}"


def as_share(fraction: float) -> str:
    """A fraction as a percentage with one decimal ("n/a" for NaN: not measured)."""
    return "n/a" if math.isnan(fraction) else f"{100 * fraction:.1f} %"


def as_signed(value: float, decimals: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:+,.{decimals}f}"


def as_range(values: Sequence[float]) -> str:
    return f"{min(values):,.0f}–{max(values):,.0f}" if values else "n/a"
