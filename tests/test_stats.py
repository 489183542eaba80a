"""clex/stats.py against scipy: the Student-t interval (t.interval, ttest_rel) and the exact sign-flip test
(permutation_test over all within-pair swaps), and the floor 2/2^n of the sign-flip p-value."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from clex.stats import mean_ci, min_p, paired, sign_flip_p


def _scipy_sign_flip(x, y) -> float:
    """Exact paired permutation test: every assignment of each pair's two values to the two groups."""
    res = stats.permutation_test((x, y), lambda a, b, axis: np.mean(a - b, axis=axis), vectorized=True,
                                 permutation_type="samples", n_resamples=np.inf, alternative="two-sided")
    return float(res.pvalue)


def _pairs(n: int, seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    y = rng.normal(10, 2, n)
    return y + shift + rng.normal(0, 1, n), y


def test_mean_ci_matches_closed_form():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))  # t_{0.975, 2} · s / √n
    assert math.isnan(mean_ci([5.0])[1])


@pytest.mark.parametrize("n, seed, shift", [(2, 0, 0.0), (3, 1, 1.0), (6, 2, 0.5), (9, 3, -2.0)])
def test_interval_equals_scipy_t_interval_and_ttest_rel(n, seed, shift):
    x, y = _pairs(n, seed, shift)
    d = x - y
    got = paired(d)
    lo, hi = stats.t.interval(0.95, df=n - 1, loc=d.mean(), scale=stats.sem(d))
    ci = stats.ttest_rel(x, y).confidence_interval(0.95)
    assert got.mean == pytest.approx(d.mean(), rel=1e-12)
    assert (got.low, got.high) == pytest.approx((lo, hi), rel=1e-10)
    assert (got.low, got.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert got.n == n


@pytest.mark.parametrize("n, seed, shift", [(2, 0, 1.0), (3, 1, 1.0), (3, 4, 0.0), (5, 2, 0.3), (6, 3, 2.0),
                                            (8, 5, 0.1), (10, 6, -0.5)])
def test_sign_flip_p_equals_scipy_exact_permutation_test(n, seed, shift):
    x, y = _pairs(n, seed, shift)
    assert sign_flip_p(x - y) == pytest.approx(_scipy_sign_flip(x, y), abs=1e-12)


@pytest.mark.parametrize("d", [[1.0, 1.0, -1.0, 1.0], [0.0, 2.0, 2.0, -2.0, 0.0], [0.1, 0.2, 0.1],
                               [0.0, 0.0, 0.0], [3.0, -3.0]])
def test_sign_flip_ties_counted_as_scipy(d):
    """Exact and near-exact ties (0.1 + 0.2 − 0.1 vs −0.1 + 0.2 + 0.1 differ in the last bit) count."""
    y = np.full(len(d), 5.0)
    assert sign_flip_p(d) == pytest.approx(_scipy_sign_flip(y + np.asarray(d), y), abs=1e-12)


def test_sign_flip_p_by_enumeration():
    """The definition, written out: share of the 2^n sign vectors with |mean| at least the observed one."""
    d = np.array([0.7, -0.2, 1.5, 0.9, 0.4])
    flips = [abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12 for s in itertools.product((1, -1), repeat=5)]
    assert sign_flip_p(d) == sum(flips) / 32


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_smallest_p_is_two_over_two_to_the_n(n):
    """All differences of one sign and well apart: only ε = ±1 reach |mean(d)|."""
    d = 2.0 ** np.arange(n)  # distinct magnitudes: no other sign vector ties
    assert sign_flip_p(d) == sign_flip_p(-d) == min_p(n) == min(1.0, 2 / 2 ** n)
    assert paired(d).min_p == min_p(n)


def test_three_seeds_can_never_give_p_below_a_quarter():
    rng = np.random.default_rng(0)
    ps = [sign_flip_p(rng.normal(rng.normal(0, 5), rng.uniform(0.01, 3), 3)) for _ in range(500)]
    ps += [sign_flip_p(d) for d in ([100.0, 101.0, 99.0], [1e-9, 2e-9, 3e-9], [-5.0, -5.0, -5.0])]
    assert min(ps) == 0.25 and min_p(3) == 0.25 and min_p(6) == 0.03125


def test_constant_and_single_differences():
    same = paired([0.3, 0.3, 0.3])
    assert (same.mean, same.low, same.high, same.p) == pytest.approx((0.3, 0.3, 0.3, 0.25))
    one = paired([1.2])
    assert one.mean == 1.2 and math.isnan(one.low) and math.isnan(one.high) and one.p == 1.0


def test_large_n_enumerates_in_chunks():
    """2^17 sign vectors (two chunks) against scipy's exact test."""
    x, y = _pairs(17, 7, 0.4)
    assert sign_flip_p(x - y) == pytest.approx(_scipy_sign_flip(x, y), abs=1e-12)
