"""Small statistics for benchmark tables: percentiles with bootstrap CIs, Wilson intervals,
Student-t intervals of a mean over a few seeds."""
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


# Two-sided 95% Student-t quantiles t_{0.975, df}; between table entries the next smaller df
# is used, which widens the interval slightly (conservative). Beyond df 30: the normal 1.96.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def mean_ci(values) -> dict:
    """Mean of per-seed values and its 95% Student-t interval (n - 1 degrees of freedom).

    Returns {"mean", "ci95": [lo, hi], "n", "values"}; one value gives a zero-width interval
    (no spread can be estimated), reported as such rather than as NaN.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_ci got non-finite values {x.tolist()}")
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "ci95": [mean, mean], "n": 1, "values": x.tolist()}
    df = x.size - 1
    quantile = 1.959964 if df > 30 else _T975[max(d for d in _T975 if d <= df)]
    half = quantile * float(x.std(ddof=1)) / math.sqrt(x.size)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(x.size), "values": x.tolist()}
