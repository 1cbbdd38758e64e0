"""Small statistics for benchmark tables: percentiles with bootstrap CIs, Wilson intervals."""
from __future__ import annotations

import math

import numpy as np


def percentile_ci(samples, q: float, seed: int = 0, n_boot: int = 2000, level: float = 0.95) -> dict:
    """Percentile `q` (0-100) of `samples` and its bootstrap confidence interval."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise ValueError("percentile_ci needs at least one sample")
    rng = np.random.default_rng(seed)
    boots = np.percentile(rng.choice(x, size=(n_boot, x.size), replace=True), q, axis=1)
    lo, hi = np.percentile(boots, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return {"value": float(np.percentile(x, q)), "ci95": [float(lo), float(hi)]}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
