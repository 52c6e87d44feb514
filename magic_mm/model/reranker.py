"""``MagicReranker``: the same architecture as the embedder, used as a judge of relevance.

Started from the stage-1 (generative) model and trained with two summed losses
(see ``magic_mm.train.reranker``): pointwise cross-entropy on the "Yes"/"No"
tokens, and listwise, where the model writes the index of the positive among a
few negatives.  At inference ``rerank`` scores each of the embedder's top k with
logit(Yes) − logit(No) and sorts them.

A reranker folder is an embedder folder (``config.json`` + connector/LoRA
weights) with a ``reranker.json`` holding its prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from magic_mm.errors import BadInputError, ModelFolderError
from magic_mm.model.config import DEFAULT_MODEL_FOLDER, DEFAULT_MODEL_NAME
from magic_mm.model.embedder import MagicEmbedder
from magic_mm.model.generative import GenExample, build_batch, logits, token_id
from magic_mm.model.inputs import PreparedInput

RERANKER_FILE = "reranker.json"
DEFAULT_SUBFOLDER = "reranker"  # magic-mm-tiny's reranker lives in default_model/reranker/


@dataclass
class RerankerPrompts:
    question: str = "Does the candidate match the query? Answer Yes or No."
    listwise: str = "Which candidate matches the query? Answer with its number."
    yes: str = "Yes"
    no: str = "No"


@dataclass(frozen=True)
class RerankHit:
    index: int  # position in the candidates given to ``rerank``
    score: float  # logit(Yes) - logit(No); higher is more relevant


def candidate_list(candidates: Sequence[Any]) -> list[Any]:
    """``candidates`` as a list; a bare str/bytes or a non-sequence is the caller's mistake."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
        raise BadInputError("rerank() takes a list of candidates; wrap a single one in a list")
    return list(candidates)


def rerank_head(candidates: Sequence[Any], top_k: int) -> list[Any]:
    """The first ``top_k`` candidates, which ``rerank`` rescores (the first stage's top k)."""
    if top_k < 1:
        raise BadInputError(f"top_k must be >= 1, got {top_k}")
    return candidate_list(candidates)[:top_k]


def ranked(scores: Sequence[float]) -> list[RerankHit]:
    """Hits best first; equal scores keep their input (first-stage) order."""
    return sorted((RerankHit(i, float(s)) for i, s in enumerate(scores)), key=lambda h: -h.score)


class MagicReranker(torch.nn.Module):
    """Rescore a query's candidates.

    >>> reranker = MagicReranker.from_pretrained("magic-mm-tiny")
    >>> reranker.rerank("a dog on the beach", [Path("a.jpg"), Path("b.jpg")], top_k=2)
    [RerankHit(index=1, score=2.3), RerankHit(index=0, score=-0.7)]
    """

    def __init__(self, model: MagicEmbedder, prompts: RerankerPrompts | None = None) -> None:
        super().__init__()
        self.model = model
        self.prompts = prompts or RerankerPrompts()

    @classmethod
    def from_pretrained(cls, name_or_folder: str | Path = DEFAULT_MODEL_NAME, **kwargs: Any) -> MagicReranker:
        """A folder written by ``save_pretrained``; ``magic-mm-tiny`` means its bundled reranker."""
        name = str(name_or_folder)
        folder = DEFAULT_MODEL_FOLDER / DEFAULT_SUBFOLDER if name == DEFAULT_MODEL_NAME else Path(name).expanduser()
        if not (folder / RERANKER_FILE).is_file():
            raise ModelFolderError(
                f"{name}: not a reranker folder (no {RERANKER_FILE}); train one with `magic-mm train reranker`"
            )
        try:
            prompts = RerankerPrompts(**json.loads((folder / RERANKER_FILE).read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelFolderError(f"{folder / RERANKER_FILE}: malformed ({exc}); re-save the reranker") from None
        return cls(MagicEmbedder.from_pretrained(folder, **kwargs), prompts)

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = self.model.save_pretrained(folder)
        (folder / RERANKER_FILE).write_text(json.dumps(asdict(self.prompts), indent=2) + "\n")
        return folder

    # -- prompts --------------------------------------------------------------------
    @staticmethod
    def _segments(label: str, item: PreparedInput) -> list[Any]:
        parts: list[Any] = [f"{label}: "]
        if item.image is not None:
            parts += [item.image, " "]
        if item.text:
            parts.append(item.text)
        parts.append("\n")
        return parts

    def pointwise_example(self, query: PreparedInput, candidate: PreparedInput, answer: bool | None = None) -> GenExample:
        segments = self._segments("Query", query) + self._segments("Candidate", candidate)
        segments.append(self.prompts.question + "\nAnswer: ")
        return GenExample(segments, None if answer is None else (self.prompts.yes if answer else self.prompts.no))

    def listwise_example(self, query: PreparedInput, candidates: Sequence[PreparedInput],
                         positive: int | None = None) -> GenExample:
        segments = self._segments("Query", query)
        for i, c in enumerate(candidates, 1):
            segments += self._segments(f"Candidate {i}", c)
        segments.append(self.prompts.listwise + "\nAnswer: ")
        return GenExample(segments, None if positive is None else str(positive + 1))

    # -- scoring --------------------------------------------------------------------
    def yes_no(self, examples: list[GenExample]) -> torch.Tensor:
        """``(B, 2)`` logits of Yes / No after each pointwise prompt (differentiable)."""
        batch = build_batch(self.model, examples)
        out = logits(self.model, batch, batch.prompt_end)
        return out[:, [token_id(self.model, self.prompts.yes), token_id(self.model, self.prompts.no)]]

    def score(self, query: Any, candidates: Sequence[Any], batch_size: int = 8) -> list[float]:
        """logit(Yes) − logit(No) for every candidate, in order."""
        q = self.model.prepare([query])[0]
        prepared = self.model.prepare(list(candidates))
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(prepared), batch_size):
                chunk = prepared[start : start + batch_size]
                out = self.yes_no([self.pointwise_example(q, c) for c in chunk])
                scores += (out[:, 0] - out[:, 1]).float().tolist()
        return scores

    def rerank(self, query: Any, candidates: Sequence[Any], top_k: int = 5) -> list[RerankHit]:
        """Rescore the first ``top_k`` candidates (the embedder's top k) and sort them, best first."""
        return ranked(self.score(query, rerank_head(candidates, top_k)))
