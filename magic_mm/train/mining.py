"""Global hard-negative mining (stage 2) and the exclusion rules it shares with stage 3.

For each query every candidate of the pool is ranked by the current model.  The
ground truth and everything in the query's group (e.g. the other captions of the
same image, or the image itself) are dropped first; then the very top ranks are
skipped because they are mostly unlabelled positives, and the negatives are
sampled from a rank window (the paper uses roughly ranks 50–100).  Optionally, candidates
scoring above a per-query cap are dropped before the window is taken: positive-aware mining
(NV-Retriever's rule caps at 95 % of the positive's own score), for pools too small for the
window alone to skip the unlabelled positives.
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
    score_caps: Sequence[float] | None = None,
) -> list[list[int]]:
    """Hard negatives (candidate indices) for each row of ``scores`` (queries × candidates);
    ``score_caps`` (one per query) excludes candidates scoring above it."""
    rng = np.random.default_rng(seed)
    caps = [np.inf] * len(scores) if score_caps is None else score_caps
    picks = []
    for row, group, cap in zip(scores, query_groups, caps):
        ranking = eligible_ranking(row, group, candidate_groups)
        picks.append(sample_window(ranking[np.asarray(row)[ranking] <= cap], window, count, rng))
    return picks


def positive_aware_caps(scores: np.ndarray, positives: Sequence[int], ratio: float) -> list[float]:
    """Each query's score cap: ``ratio`` × its positive's score (a positive scoring <= 0 caps at
    its own score, since scaling a negative score down would raise the cap above it)."""
    own = np.asarray(scores)[np.arange(len(positives)), positives]
    return [float(ratio * s if s > 0 else s) for s in own]
