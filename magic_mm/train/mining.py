"""Global hard-negative mining (stage 2) and the exclusion rules it shares with stage 3.

For each query every candidate of the pool is ranked by the current model.  The
ground truth and everything in the query's group (e.g. the other captions of the
same image, or the image itself) are dropped first; then the very top ranks are
skipped because they are mostly unlabelled positives, and the negatives are
sampled from a rank window (the paper uses roughly ranks 50–100).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def eligible_ranking(scores: np.ndarray, query_group: object, candidate_groups: Sequence[object]) -> np.ndarray:
    """Candidate indices by descending score, without those sharing ``query_group``."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    groups = np.asarray(candidate_groups, dtype=object)
    return order[groups[order] != query_group]


def sample_window(ranking: np.ndarray, window: tuple[int, int], count: int, rng: np.random.Generator) -> list[int]:
    """``count`` distinct indices from ``ranking[window[0]:window[1]]``.

    A pool too small for the window slides the window back to the pool's end, so
    a small pool still yields its lowest-ranked eligible items rather than none.
    """
    start, end = window
    width = end - start
    if len(ranking) < end:
        end = len(ranking)
        start = max(0, end - width)
    pool = ranking[start:end]
    take = min(count, len(pool))
    return [int(i) for i in rng.choice(pool, size=take, replace=False)] if take else []


def mine_hard_negatives(
    scores: np.ndarray,
    query_groups: Sequence[object],
    candidate_groups: Sequence[object],
    window: tuple[int, int] = (50, 100),
    count: int = 2,
    seed: int = 0,
) -> list[list[int]]:
    """Hard negatives (candidate indices) for each row of ``scores`` (queries × candidates)."""
    rng = np.random.default_rng(seed)
    return [
        sample_window(eligible_ranking(row, group, candidate_groups), window, count, rng)
        for row, group in zip(scores, query_groups)
    ]
