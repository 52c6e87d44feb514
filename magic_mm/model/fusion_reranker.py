"""``FusionReranker``: reranks a first-stage list by first-stage score + weight × the cosine of a
second, independently trained dual encoder.

It is an ensemble of two retrievers, not a cross-encoder and not the paper's MLLM reranker
(that one is ``MagicReranker``, ``magic_mm/model/reranker.py``): the query and a candidate are
never read together.  The first stage is the embedder that produced the list (magic-mm-tiny for
the shipped folder); the second is the dual encoder of ``magic_mm/model/dual_encoder.py``
(frozen EfficientNet-Lite0 + frozen MiniLM, two linear heads).  Each candidate of the list gets

    fused = first-stage score + weight × dual-encoder cosine(query, candidate)

and the list is sorted by it (ties keep the first-stage order).  The dual encoder only embeds
captions (queries) and images (candidates), so it scores only a **text query against an image
candidate**; for any other pair (an image query, a text candidate, an image with a text) the
fused score is the first-stage score alone.

The weight is chosen on a validation split by ``benchmarks/fusion_reranker.py`` and belongs to
the first stage it was chosen with (the first-stage scores must be on that scale: the embedder's
cosine).  A folder holds ``fusion_reranker.json`` (format tag, ``weight``, how it was chosen)
and the dual encoder's own files (``dual_encoder.json``, ``heads.safetensors``).

>>> embedder = MagicEmbedder.from_pretrained("magic-mm-tiny")
>>> reranker = FusionReranker.from_pretrained("magic-mm-tiny", embedder=embedder)
>>> reranker.rerank("a dog on the beach", [Path("a.jpg"), Path("b.jpg")], top_k=2)
[RerankHit(index=1, score=0.61), RerankHit(index=0, score=0.48)]
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magic_mm.errors import BadInputError, ModelFolderError
from magic_mm.model.config import DEFAULT_MODEL_FOLDER, DEFAULT_MODEL_NAME
from magic_mm.model.dual_encoder import CONFIG_FILE as DUAL_CONFIG_FILE
from magic_mm.model.dual_encoder import HEADS_FILE as DUAL_HEADS_FILE
from magic_mm.model.dual_encoder import DualEncoder
from magic_mm.model.inputs import PreparedInput, prepare
from magic_mm.model.reranker import RerankHit, candidate_list, ranked, rerank_head

FUSION_FILE = "fusion_reranker.json"
FORMAT = "magic-mm-fusion-reranker"
DEFAULT_SUBFOLDER = "fusion_reranker"  # magic-mm-tiny's fusion reranker lives in default_model/fusion_reranker/
MAKE_ONE = "make one with `python benchmarks/fusion_reranker.py --out FOLDER` (or `make fusion-reranker`)"


def fused_scores(first_stage: Sequence[float] | np.ndarray, dual: Sequence[float] | np.ndarray,
                 weight: float) -> np.ndarray:
    """``first_stage + weight × dual`` per candidate; where ``dual`` is NaN (the dual encoder has
    no score for that pair) the first-stage score alone."""
    first = np.asarray(first_stage, dtype=np.float64)
    second = np.asarray(dual, dtype=np.float64)
    if first.shape != second.shape:
        raise ValueError(f"{first.shape} first-stage scores but {second.shape} dual-encoder scores")
    return np.where(np.isnan(second), first, first + weight * np.nan_to_num(second))


class FusionReranker:
    """Reranks a first-stage list by first-stage score + weight × the cosine of a second,
    independently trained dual encoder (see the module docstring)."""

    def __init__(self, dual: DualEncoder, weight: float, selection: dict[str, Any] | None = None,
                 embedder: Any = None) -> None:
        if not (isinstance(weight, (int, float)) and math.isfinite(weight)):
            raise BadInputError(f"weight must be a finite number, got {weight!r}")
        self.dual = dual
        self.weight = float(weight)
        self.selection = selection or {}  # how the weight was chosen (saved in fusion_reranker.json)
        self.embedder = embedder  # first stage for calls without first_stage_scores (a MagicEmbedder)

    # -- folders --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path = DEFAULT_MODEL_NAME, embedder: Any = None) -> FusionReranker:
        """A folder written by ``save_pretrained``; ``magic-mm-tiny`` means its bundled one.

        ``embedder`` (the first stage, e.g. ``MagicEmbedder.from_pretrained("magic-mm-tiny")``) is
        only needed to call ``rerank`` without ``first_stage_scores``."""
        name = str(folder)
        path = DEFAULT_MODEL_FOLDER / DEFAULT_SUBFOLDER if name == DEFAULT_MODEL_NAME else Path(name).expanduser()
        spec_path = path / FUSION_FILE
        if not spec_path.is_file():
            raise ModelFolderError(f"{path}: not a fusion-reranker folder (no {FUSION_FILE}); {MAKE_ONE}")
        try:
            spec = json.loads(spec_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFolderError(f"{spec_path}: not valid JSON ({exc}); re-save it with "
                                   "`python benchmarks/fusion_reranker.py`") from None
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
            raise ModelFolderError(f"{spec_path}: format is {found!r}, not {FORMAT!r}; "
                                   "point at a folder saved by benchmarks/fusion_reranker.py")
        weight = spec.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ModelFolderError(f"{spec_path}: \"weight\" must be a finite number, got {weight!r}; "
                                   "re-save it with `python benchmarks/fusion_reranker.py`")
        for needed in (DUAL_CONFIG_FILE, DUAL_HEADS_FILE):
            if not (path / needed).is_file():
                raise ModelFolderError(f"{path}: the dual encoder's {needed} is missing; copy the dual encoder's "
                                       f"files ({DUAL_CONFIG_FILE}, {DUAL_HEADS_FILE}) into it, or {MAKE_ONE}")
        return cls(DualEncoder.from_pretrained(path), weight, spec.get("selection"), embedder)

    def save_pretrained(self, folder: str | Path) -> Path:
        """``fusion_reranker.json`` plus the dual encoder's files, in one folder."""
        folder = self.dual.save_pretrained(folder)
        spec = {"format": FORMAT, "weight": self.weight, "selection": self.selection}
        (folder / FUSION_FILE).write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
        return folder

    # -- scoring --------------------------------------------------------------------
    def dual_scores(self, query: Any, candidates: Sequence[Any]) -> np.ndarray:
        """The dual encoder's cosine per candidate; NaN where the pair is not text query → image
        candidate (the dual encoder has no score for it)."""
        q, items = self._prepare(query, candidates)
        return self._dual_scores(q, items)

    def first_stage_scores(self, query: Any, candidates: Sequence[Any]) -> np.ndarray:
        """The embedder's cosine per candidate (query role "query", candidates role "candidate")."""
        q, items = self._prepare(query, candidates)
        return self._first_stage(q, items)

    def score(self, query: Any, candidates: Sequence[Any],
              first_stage_scores: Sequence[float] | np.ndarray | None = None) -> list[float]:
        """The fused score of every candidate, in order."""
        return fused_scores(*self._parts(query, candidates, first_stage_scores), self.weight).tolist()

    def rank(self, first_stage_scores: Sequence[float] | np.ndarray,
             dual_scores: Sequence[float] | np.ndarray) -> list[RerankHit]:
        """What ``rerank`` answers, from scores already at hand: ``dual_scores`` as ``dual_scores()``
        gives them (NaN: no dual-encoder score).  For benchmarks that embed each image once
        rather than once per (query, candidate) pair."""
        return ranked(fused_scores(first_stage_scores, dual_scores, self.weight))

    def rerank(self, query: Any, candidates: Sequence[Any], top_k: int = 5,
               first_stage_scores: Sequence[float] | np.ndarray | None = None) -> list[RerankHit]:
        """Rescore the first ``top_k`` candidates (the first stage's top k) and sort them, best first.

        ``first_stage_scores`` are the first stage's scores of ``candidates`` (one each, in order);
        without them the embedder given to ``from_pretrained`` computes its cosine.  A hit's score
        is first-stage + weight × dual cosine (the first-stage score alone unless the query is a
        text and the candidate an image)."""
        head = rerank_head(candidates, top_k)
        if first_stage_scores is not None:
            first_stage_scores = _one_each(first_stage_scores, len(candidates))[:top_k]
        return self.rank(*self._parts(query, head, first_stage_scores))

    # -- internals ------------------------------------------------------------------
    @staticmethod
    def _prepare(query: Any, candidates: Sequence[Any]) -> tuple[PreparedInput, list[PreparedInput]]:
        """Validated inputs (images decoded once), as ``MagicReranker.rerank`` accepts them."""
        return prepare(query), [prepare(c, i) for i, c in enumerate(candidate_list(candidates))]

    def _parts(self, query: Any, candidates: Sequence[Any],
               first_stage_scores: Sequence[float] | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(first-stage scores, dual-encoder cosines) of the candidates."""
        q, items = self._prepare(query, candidates)
        if first_stage_scores is None:
            first = self._first_stage(q, items)
        else:
            first = _one_each(first_stage_scores, len(items))
        if self.weight == 0:  # the first stage alone: no need to run the dual encoder
            return first, np.full(len(items), np.nan)
        return first, self._dual_scores(q, items)

    def _dual_scores(self, query: PreparedInput, items: list[PreparedInput]) -> np.ndarray:
        scores = np.full(len(items), np.nan)
        if query.image is not None or not query.text:
            return scores  # the dual encoder's text side takes captions only
        images = [n for n, c in enumerate(items) if c.image is not None and not c.text]
        if images:
            q = self.dual.encode([query.text], role="query")[0]
            c = self.dual.encode([items[n].image for n in images], role="candidate")
            scores[images] = c.astype(np.float64) @ q.astype(np.float64)
        return scores

    def _first_stage(self, query: PreparedInput, items: list[PreparedInput]) -> np.ndarray:
        if self.embedder is None:
            raise BadInputError("FusionReranker.rerank needs the first stage's scores: pass first_stage_scores=[...] "
                                "(one per candidate), or load it with an embedder, e.g. FusionReranker."
                                "from_pretrained(folder, embedder=MagicEmbedder.from_pretrained('magic-mm-tiny'))")
        if not items:
            return np.zeros(0)
        q = self.embedder.encode([query], role="query")
        c = self.embedder.encode(items, role="candidate")
        return np.asarray(self.embedder.similarity(q, c), dtype=np.float64)[0]


def _one_each(scores: Sequence[float] | np.ndarray, candidates: int) -> np.ndarray:
    first = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(first) != candidates:
        raise BadInputError(f"first_stage_scores has {len(first)} scores for {candidates} candidates; "
                            "give one per candidate")
    return first
