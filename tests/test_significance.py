"""Paired comparisons used by the default-model table and the dtype benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from magic_mm.eval.significance import paired_bootstrap_ci, sign_test


def test_identical_systems_differ_by_nothing() -> None:
    hits = np.random.default_rng(0).random(500) < 0.4
    assert paired_bootstrap_ci(hits, hits) == (0.0, 0.0, 0.0)


def test_a_real_gain_is_inside_its_interval_and_zero_is_not() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(1000) < 0.4
    b = a.copy()
    b[np.flatnonzero(~a)[:100]] = True  # 100 of 1,000 queries gained, none lost: +10 points
    mean, low, high = paired_bootstrap_ci(a, b)
    assert mean == pytest.approx(0.1)
    assert 0.07 < low < 0.1 < high < 0.13


def test_the_interval_is_about_the_pairs_not_the_marginals() -> None:
    # same R@k for both (50 %), but half of the queries swapped outcome: mean 0, a wide interval
    a = np.array([True, False] * 200)
    b = ~a
    mean, low, high = paired_bootstrap_ci(a, b)
    assert mean == 0.0 and low < -0.05 and high > 0.05


def test_reproducible_and_checked() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random(300) < 0.5, rng.random(300) < 0.5
    assert paired_bootstrap_ci(a, b, seed=3) == paired_bootstrap_ci(a, b, seed=3)
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap_ci(a, b[:10])


def test_sign_test() -> None:
    assert sign_test(0, 0) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 2**10)
    assert sign_test(5, 5) == 1.0
    assert sign_test(3, 9) == sign_test(9, 3) == pytest.approx(2 * (1 + 12 + 66 + 220) / 2**12)
