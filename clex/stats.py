"""Statistics over fine-tune seeds that stay honest at a handful of seeds (docs/statistics.md).

Per evaluation length, with paired differences d_s = x_s − ref_s (same seed, same length):
- the mean of d and its Student-t 95 % interval, df = n − 1 (assumes roughly normal d_s);
- the exact two-sided sign-flip p-value: the share of all 2^n sign vectors ε with |mean(ε·d)| >= |mean(d)|
  (ties counted). It assumes only that, under no effect, each d_s is as likely to be +|d_s| as −|d_s|.
  The observed vector and its negation always count, so p >= 2/2^n: 0.25 at 3 seeds, 0.03125 at 6.
The percentile bootstrap is not used: with 3 seeds its 95 % interval is [min, max] of the three.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
CHUNK = 1 << 16  # sign vectors per matrix product: memory stays small for any n
REL_TIE = 100 * np.finfo(float).eps  # |T| within this relative distance of |T_obs| counts as a tie (as scipy)


def mean_ci(values, level: float = LEVEL) -> tuple[float, float]:
    """Mean and the half-width of its Student-t interval (df = n − 1); half-width nan for one value."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def min_p(n: int) -> float:
    """The smallest p-value the exact sign-flip test can give with n paired values: 2/2^n (1 for n <= 1)."""
    return min(1.0, 2.0 / 2.0 ** n)


def sign_flip_p(diffs) -> float:
    """Exact two-sided sign-flip p-value of mean(diffs) = 0, over all 2^n sign vectors (nan for none)."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return float("nan")
    observed = abs(d.mean())
    bits = np.arange(n)
    hits = 0
    for start in range(0, 2 ** n, CHUNK):
        codes = np.arange(start, min(start + CHUNK, 2 ** n))[:, None]
        signs = 1.0 - 2.0 * ((codes >> bits) & 1)  # row k: the signs of sign vector number k
        hits += int(np.count_nonzero(np.abs(signs @ d / n) >= observed * (1 - REL_TIE)))
    return hits / 2 ** n


@dataclass(frozen=True)
class Paired:
    """Paired differences over n seeds: mean, Student-t interval [low, high] (nan below 2 seeds), exact
    sign-flip p-value and the smallest p the test could have given with n seeds."""

    mean: float
    low: float
    high: float
    p: float
    n: int

    @property
    def min_p(self) -> float:
        return min_p(self.n)


def paired(diffs, level: float = LEVEL) -> Paired:
    """Mean, t-interval and exact sign-flip p of per-seed differences (each d_s = x_s − ref_s)."""
    mean, half = mean_ci(diffs, level)
    return Paired(mean, mean - half, mean + half, sign_flip_p(diffs), len(diffs))
