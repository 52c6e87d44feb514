"""Search an index with a text, an image or both, optionally reranking the top candidates.

All rerank logic lives here: ``load_reranker`` (the one check for whether
the model has a reranker, and which kind), ``reranker_scores`` (the one adapter to its
``rerank`` method) and ``retrieve`` (embedder top-k, then rerank the head).
The CLI and the server both call ``retrieve``.

Two kinds of reranker answer ``rerank(query, candidates, top_k)``: ``FusionReranker``
(magic-mm-tiny's: first-stage score + weight × a dual encoder's cosine; it also takes
``first_stage_scores``, which ``rerank_hits`` fills with the hits' embedder scores) and
``MagicReranker`` (the paper's MLLM reranker, a folder with ``reranker.json``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magic_mm.errors import BadInputError, UserError
from magic_mm.index.files import page_image
from magic_mm.index.store import Hit, ModelStamp, PageStore
from magic_mm.model.embedder import MagicEmbedder
from magic_mm.model.inputs import ImageLike, MMInput

# The paper reranks the embedder's top 5; we default to a few more because a page store
# is noisier than a benchmark's candidate list.  Each candidate costs one reranker pass.
DEFAULT_RERANK_TOP = 10


class RerankerUnavailableError(UserError):
    """``--rerank`` was asked for, but the model has no reranker."""


def load_reranker(model: str, embedder: MagicEmbedder | None = None, device: str = "cpu") -> Any:
    """The reranker for ``model``, or a ``RerankerUnavailableError`` saying why not.

    ``magic-mm-tiny`` → its shipped ``FusionReranker`` (default_model/fusion_reranker/); a folder
    with ``fusion_reranker.json`` → that ``FusionReranker``; otherwise a ``MagicReranker`` folder
    (``reranker.json``).  ``embedder`` (the first stage) lets a ``FusionReranker`` score
    candidates that come without first-stage scores.  A ``MagicReranker`` is loaded on ``device``;
    a ``FusionReranker``'s own small text encoder stays on the CPU."""
    from magic_mm.model.config import DEFAULT_MODEL_NAME
    from magic_mm.model.fusion_reranker import FUSION_FILE, FusionReranker
    from magic_mm.model.reranker import MagicReranker

    try:
        if model == DEFAULT_MODEL_NAME or _holds(model, FUSION_FILE):
            return FusionReranker.from_pretrained(model, embedder=embedder)
        return MagicReranker.from_pretrained(model, device=device)
    except (UserError, OSError, TypeError, ValueError) as exc:
        raise RerankerUnavailableError(
            f"reranking is not available for model {model!r} ({exc}); search without reranking") from None


def _holds(folder: str, name: str) -> bool:
    try:
        return (Path(folder).expanduser() / name).is_file()
    except (OSError, ValueError):  # not a usable path (too long, a NUL byte): a model name
        return False


def takes_first_stage_scores(reranker: Any) -> bool:
    """Whether ``reranker.rerank`` accepts ``first_stage_scores`` (``FusionReranker`` does)."""
    try:
        return "first_stage_scores" in inspect.signature(reranker.rerank).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def reranker_scores(reranker: Any, query: MMInput, candidates: Sequence[MMInput],
                    first_stage_scores: Sequence[float] | None = None) -> list[float]:
    """One relevance score per candidate (higher is better), in the candidates' order.

    ``rerank(query, candidates, top_k)`` may answer with one score per candidate, or with
    ranked ``(index, score)`` pairs / objects / dicts; all become a score per candidate.
    ``first_stage_scores`` (one per candidate) go to rerankers that take them and are
    ignored by the others.
    """
    if first_stage_scores is not None and takes_first_stage_scores(reranker):
        result = reranker.rerank(query, list(candidates), top_k=len(candidates),
                                 first_stage_scores=[float(s) for s in first_stage_scores])
    else:
        result = reranker.rerank(query, list(candidates), top_k=len(candidates))
    if isinstance(result, np.ndarray) or (len(result) and isinstance(result[0], (int, float, np.floating))):
        scores = [float(s) for s in np.asarray(result, dtype=np.float64).reshape(-1)]
        if len(scores) != len(candidates):
            raise RuntimeError(f"reranker returned {len(scores)} scores for {len(candidates)} candidates")
        return scores
    scores = [float("-inf")] * len(candidates)
    for entry in result:
        if isinstance(entry, dict):
            index, score = entry["index"], entry.get("score", entry.get("relevance_score"))
        elif isinstance(entry, (tuple, list)):
            index, score = entry
        else:
            index, score = entry.index, entry.score
        scores[int(index)] = float(score)
    return scores


def query_input(text: str | None, image: ImageLike | None) -> MMInput:
    """The query as one input; at least one of ``text`` and ``image`` is needed."""
    text = text if text and text.strip() else None
    if text is None and image is None:
        raise BadInputError("empty query: give a search text, an image (--image), or both")
    return MMInput(text=text, image=image, name="the query")


def embed_query(embedder: MagicEmbedder, query: MMInput) -> np.ndarray:
    return embedder.encode([query], role="query")[0]


def retrieve(
    store: PageStore,
    vector: np.ndarray,
    k: int,
    query: MMInput | None = None,
    reranker: Any = None,
    rerank_top: int = DEFAULT_RERANK_TOP,
    exact: bool = False,
) -> list[Hit]:
    """Top ``k`` pages for ``vector``; with a reranker, its scores reorder the first ``rerank_top``."""
    if k < 1:
        raise BadInputError(f"k={k}: ask for at least one result")
    hits = store.search(vector, max(k, rerank_top) if reranker is not None else k, exact=exact)
    if reranker is not None:
        if query is None:
            raise BadInputError("reranking needs the query itself, not only its vector")
        hits = rerank_hits(reranker, query, hits, rerank_top)
    return hits[:k]


def rerank_hits(reranker: Any, query: MMInput, hits: list[Hit], top: int) -> list[Hit]:
    """Reorder the first ``top`` hits by reranker score; pages whose file is gone keep no score.
    The hits' own (embedder) scores go along as first-stage scores to rerankers that take them."""
    head, tail = hits[:top], hits[top:]
    readable, candidates = [], []
    for hit in head:
        try:
            image = page_image(Path(hit.path), hit.kind, hit.page)
        except (UserError, OSError):
            continue
        readable.append(hit)
        candidates.append(MMInput(image=image, name=f"{hit.path} page {hit.page}"))
    if candidates:
        first_stage = [hit.score for hit in readable]
        for hit, score in zip(readable, reranker_scores(reranker, query, candidates, first_stage)):
            hit.rerank_score = score
            hit.score = score
    ranked = sorted(readable, key=lambda h: -h.score) + [h for h in head if h not in readable] + tail
    for rank, hit in enumerate(ranked, 1):
        hit.rank = rank
    return ranked


def check_same_model(store: PageStore, embedder: MagicEmbedder, model: str) -> str | None:
    """Raise if the index was built by another model; a note if only the dtype differs."""
    return store.check_model(ModelStamp.of(embedder, model))
