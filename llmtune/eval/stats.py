"""Uncertainty and paired comparisons over per-item results: percentile bootstrap CIs of a mean, McNemar's
exact test for paired right/wrong outcomes, and a paired bootstrap for paired scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


def bootstrap_ci(values: list[float], resamples: int, confidence: float, seed: int) -> Interval:
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return Interval(float(data.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def mcnemar_exact(baseline: list[float], candidate: list[float]) -> dict[str, float]:
    """Two-sided exact McNemar test: among items where exactly one model is right, is either side favoured?"""
    base, cand = np.asarray(baseline) > 0.5, np.asarray(candidate) > 0.5
    only_candidate, only_baseline = int(np.sum(cand & ~base)), int(np.sum(base & ~cand))
    discordant = only_candidate + only_baseline
    p_value = 1.0 if discordant == 0 else binomtest(only_candidate, discordant, 0.5).pvalue
    return {"only_candidate_right": only_candidate, "only_baseline_right": only_baseline, "p_value": float(p_value)}


def paired_bootstrap(baseline: list[float], candidate: list[float], resamples: int, confidence: float,
                     seed: int) -> dict[str, float]:
    """Mean difference (candidate - baseline) with its CI and a two-sided bootstrap p-value."""
    diff = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    if diff.size == 0:
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "p_value": 1.0}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    p_value = 1.0 if np.all(diff == 0) else float(min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0))))
    return {"difference": float(diff.mean()), "low": float(np.percentile(means, tail)),
            "high": float(np.percentile(means, 100 - tail)), "p_value": p_value}
