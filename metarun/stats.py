"""The statistics a sweep report quotes: spread over seeds and a paired test on shared episodes.

Over seeds, a configuration is summarized by its mean and sample standard deviation (ddof=1).
Two configurations tested on the same episodes are compared episode by episode (Student, 1908):
with d_i = b_i - a_i over n episodes,

    mean(d) ± t_{0.975, n-1} * std(d, ddof=1) / sqrt(n),   p from the paired t-test of b against a.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); the std of a single value is nan."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_and_std needs at least one value")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float, int]:
    """(mean of b - a, its 95% CI half-width from the t distribution, paired t-test p-value, n pairs).

    `a[i]` and `b[i]` are the scores of the same episode; at least two pairs are needed.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape or a.size < 2:
        raise ValueError(f"paired_difference needs two equal-length lists of 2 or more scores, got {a.shape} and {b.shape}")
    n = a.size
    d = b - a
    ci95 = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return float(d.mean()), float(ci95), float(stats.ttest_rel(b, a).pvalue), n
