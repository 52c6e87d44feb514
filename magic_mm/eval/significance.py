"""Is a difference between two systems on the same queries real or noise?

Both helpers take paired per-query outcomes (for example hit@5 of two models on the same
1,080 captions): only queries whose outcome differs carry information.
"""

from __future__ import annotations

from math import comb

import numpy as np


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``b - a`` and its bootstrap confidence interval, resampling queries with replacement."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired outcomes must be two equal-length 1-D arrays, got {a.shape} and {b.shape}")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(low), float(high)


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact binomial p-value of gained vs lost under 'no difference' (p = 1/2)."""
    n, low = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(low + 1)) / 2**n)
