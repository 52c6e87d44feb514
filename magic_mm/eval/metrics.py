"""Retrieval metrics on one query's scored candidates.

Everything derives from one ranking per query (``rank_order``), so hit@k,
recall@k, MRR and nDCG@k always agree on how ties were broken.

Relevance is graded: ``grades[i] > 0`` marks candidate ``i`` relevant, and the
grade is the gain nDCG uses (linear gain, ``grade / log2(rank + 1)``, the
trec_eval convention).  MMEB tasks have one positive (grade 1 at index 0).

Ties
----
A model that gives every candidate the same score must not score hit@1 = 1
just because MMEB puts the positive at index 0.  So ties are broken
*pessimistically* by default: among equal scores, lower grades rank first.
``ties="optimistic"`` does the reverse; ``ties="index"`` keeps candidate order
(what ``argmax`` does, i.e. MMEB's own scorer, which favours index 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Ties = Literal["pessimistic", "optimistic", "index"]
TIES: tuple[str, ...] = ("pessimistic", "optimistic", "index")
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
NDCG_K = 5


def metric_names(ks: Sequence[int] = DEFAULT_KS, ndcg_k: int = NDCG_K) -> list[str]:
    """The keys ``query_metrics`` returns, in order."""
    return [n for k in ks for n in (f"hit@{k}", f"recall@{k}")] + ["mrr", f"ndcg@{ndcg_k}"]


def rank_order(scores: np.ndarray, grades: np.ndarray, ties: Ties = "pessimistic") -> np.ndarray:
    """Candidate indices from best to worst score, ties broken as ``ties`` says."""
    scores = np.asarray(scores, dtype=np.float64)
    grades = np.asarray(grades, dtype=np.float64)
    index = np.arange(len(scores))
    if ties == "index":
        return np.lexsort((index, -scores))
    if ties == "pessimistic":
        return np.lexsort((index, grades, -scores))
    if ties == "optimistic":
        return np.lexsort((index, -grades, -scores))
    raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def dcg(gains: np.ndarray) -> float:
    discounts = np.log2(np.arange(2, len(gains) + 2))
    return float(np.sum(np.asarray(gains, dtype=np.float64) / discounts))


def query_metrics(
    scores: np.ndarray,
    grades: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    ndcg_k: int = NDCG_K,
    ties: Ties = "pessimistic",
) -> dict[str, float]:
    """hit@k, recall@k, MRR and nDCG@ndcg_k for one query.

    hit@k: some relevant candidate is in the top k (hit@1 is MMEB's precision@1).
    recall@k: the share of all relevant candidates that are in the top k.
    MRR: 1 / rank of the first relevant candidate (0 if none is relevant).
    """
    grades = np.asarray(grades, dtype=np.float64)
    if len(scores) != len(grades):
        raise ValueError(f"{len(scores)} scores but {len(grades)} grades")
    order = rank_order(scores, grades, ties)
    ranked = grades[order]
    relevant = ranked > 0
    n_relevant = int(relevant.sum())
    out: dict[str, float] = {}
    for k in ks:
        top = relevant[:k]
        out[f"hit@{k}"] = float(top.any())
        out[f"recall@{k}"] = float(top.sum() / n_relevant) if n_relevant else 0.0
    first = int(np.argmax(relevant)) if n_relevant else -1
    out["mrr"] = 1.0 / (first + 1) if n_relevant else 0.0
    ideal = dcg(np.sort(grades)[::-1][:ndcg_k])
    out[f"ndcg@{ndcg_k}"] = dcg(ranked[:ndcg_k]) / ideal if ideal > 0 else 0.0
    return out


def first_relevant_rank(scores: np.ndarray, grades: np.ndarray, ties: Ties = "pessimistic") -> int | None:
    """1-based rank of the best-placed relevant candidate, or None if none is relevant."""
    grades = np.asarray(grades)
    ranked = grades[rank_order(scores, grades, ties)] > 0
    return int(np.argmax(ranked)) + 1 if ranked.any() else None


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average each metric over queries (all rows carry the same keys)."""
    if not rows:
        return {}
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
