"""Binary-classifier metrics for failure predictors: AUROC, the F1-optimal threshold, and
precision / recall / F1 at a threshold, with episode-clustered bootstrap intervals
(samples of one episode are correlated, so episodes are what gets resampled)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties
    counting one half (the Mann-Whitney statistic). NaN when a class is missing."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same shape, got {y.shape} and {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def at_threshold(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """Predict failure when score > threshold (the harness rejects when p_fail > tau)."""
    y = np.asarray(labels, dtype=bool)
    pred = np.asarray(scores, dtype=np.float64) > threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "threshold": float(threshold),
            "rejection_rate": float(pred.mean()) if len(pred) else 0.0}


def best_f1_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """The threshold (midpoint between consecutive distinct scores) with the highest F1."""
    s = np.unique(np.asarray(scores, dtype=np.float64))
    if len(s) == 1:
        return float(s[0])
    candidates = np.concatenate([[s[0] - 1e-9], (s[:-1] + s[1:]) / 2.0])
    f1 = [at_threshold(labels, scores, t)["f1"] for t in candidates]
    return float(candidates[int(np.argmax(f1))])


def cluster_bootstrap(metric: Callable[[NDArray, NDArray], float], labels: ArrayLike, scores: ArrayLike,
                      clusters: ArrayLike, n_boot: int = 500, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile interval of `metric(labels, scores)` resampling whole clusters."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(clusters)
    ids = np.unique(c)
    members = [np.flatnonzero(c == i) for i in ids]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        rows = np.concatenate([members[i] for i in rng.integers(len(ids), size=len(ids))])
        value = metric(y[rows], s[rows])
        if np.isfinite(value):
            values.append(value)
    if not values:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]
