"""The statistics a sweep report quotes: spread over seeds, and the difference of two configurations.

Over seeds, a configuration is summarized by its mean and sample standard deviation (ddof=1).

Two configurations differ by B − A, with a 95% CI from the t distribution and a two-sided p-value
(Student, 1908; Welch, 1947). Paired, with d_i = b_i − a_i over n pairs (seeds run in both, or
test episodes both met):

    mean(d) ± t_{0.975, n-1} · std(d, ddof=1) / √n,                  p from the paired t-test.

Unpaired (Welch), with s² the sample variances (ddof=1) of n_a and n_b values:

    mean(b) − mean(a) ± t_{0.975, ν} · √(s_a²/n_a + s_b²/n_b),     p from Welch's t-test,
    ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1))   (Welch–Satterthwaite).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats


class Difference(NamedTuple):
    """B − A: its mean, the half-width of its 95% CI, the two-sided p-value, the t distribution's df."""

    mean: float
    ci95: float
    p: float
    df: float


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); the std of a single value is nan."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_and_std needs at least one value")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """B − A paired: `a[i]` and `b[i]` are the scores of the same unit (seed or episode), 2 or more pairs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape or a.size < 2:
        raise ValueError(
            f"paired_difference needs two equal-length lists of 2 or more scores, got {a.shape} and {b.shape}"
        )
    n = a.size
    d = b - a
    ci95 = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return Difference(
        float(d.mean()), float(ci95), float(stats.ttest_rel(b, a).pvalue), float(n - 1)
    )


def welch_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """B − A unpaired, variances not assumed equal: 2 or more independent scores on each side."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or b.ndim != 1 or min(a.size, b.size) < 2:
        raise ValueError(
            f"welch_difference needs two lists of 2 or more scores, got {a.shape} and {b.shape}"
        )
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size  # squared standard errors of the means
    se = math.sqrt(va + vb)
    df = (
        (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
        if se > 0
        else float(a.size + b.size - 2)
    )
    p = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
    return Difference(float(b.mean() - a.mean()), float(stats.t.ppf(0.975, df) * se), p, float(df))
