"""Numbers over seeds: mean and spread, and how a table cell shows them."""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population spread of the values measured (None and NaN left out)."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def cell(value: tuple[float, float], percent: bool = False, digits: int = 2) -> str:
    """``mean ± spread`` (as a percentage of a fraction with ``percent``), or a dash if nothing was measured."""
    mean, spread = value
    if math.isnan(mean):
        return "—"
    scale = 100 if percent else 1
    return f"{scale * mean:.{digits}f} ± {scale * spread:.{digits}f}" + (" %" if percent else "")
