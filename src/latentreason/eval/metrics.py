"""Small, dependency-free metrics for the harness."""
from __future__ import annotations

import math


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sane at 0% and 100%, unlike Wald)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the bounds hold p exactly: at 0% or 100% rounding would otherwise leave p a hair outside
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
