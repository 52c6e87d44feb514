"""A caption-data judge that reads the candidate photo's other human captions.

Named for exactly what it is: it never looks at pixels.  For a caption query and a
candidate photo it embeds the query and the photo's reference captions (from the
caption folder's ``captions.csv``) with a sentence encoder (all-MiniLM-L6-v2 by
default) and scores the pair by the best cosine similarity.  A reference equal to the
query is left out, so a caption is never judged against itself.

It fits the ``Judge`` interface: ``yes`` is that similarity and ``no`` is a fixed cut, so
the paper's rule (relevant iff yes > no) means "similarity above the cut".  ``calibrate``
in the stage-3 config moves the cut from known train pairs, as for the MLLM judges.
The measured accuracy on val pairs is in docs/training.md (``benchmarks/judge_accuracy.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from magic_mm.data.captions import read_captioned_images
from magic_mm.errors import UserError
from magic_mm.model.sentence_encoder import MINILM, SentenceEncoder
from magic_mm.train.judge import Judge

# The cut on the best cosine similarity: the one that best separated 2,000 train pairs (the first
# 200 train photos' captions, each against its own photo and one of its top-20 wrong photos) in
# benchmarks/judge_accuracy.py, rounded.
DEFAULT_CUT = 0.51


def query_from_question(template: str) -> re.Pattern[str]:
    """A pattern that recovers ``{query}`` from a question written with ``template``."""
    if template.count("{query}") != 1 or "{candidate}" in template:
        raise UserError(f"judge question {template!r}: the captions judge needs exactly one {{query}} and "
                        "no {candidate} (its candidates are photos)")
    before, after = template.split("{query}")
    return re.compile(re.escape(before) + "(.*)" + re.escape(after), re.DOTALL)


def normalised(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(" .")


class ReferenceCaptionJudge(Judge):
    def __init__(self, captions_folder: str | Path, question_template: str, encoder: str = MINILM,
                 cut: float = DEFAULT_CUT) -> None:
        self.references = {item.path.name: item.captions for item in read_captioned_images(captions_folder)}
        self.pattern = query_from_question(question_template)
        self.encoder = SentenceEncoder(encoder)
        self.cut = cut
        self.name = f"captions:{encoder}:{Path(captions_folder).resolve()}"
        self.vectors: dict[str, torch.Tensor] = {}

    def embed(self, texts: list[str]) -> list[torch.Tensor]:
        todo = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        for text, vector in zip(todo, self.encoder.encode(todo)):
            self.vectors[text] = vector
        return [self.vectors[t] for t in texts]

    def similarity(self, query: str, photo: Path) -> float:
        """The best cosine between ``query`` and the photo's captions other than ``query`` itself."""
        if photo.name not in self.references:
            raise UserError(f"{photo}: the captions judge has no reference captions for this photo; "
                            "point judge.references at the caption folder the training data comes from")
        others = [c for c in self.references[photo.name] if normalised(c) != normalised(query)]
        if not others:
            return -1.0
        q, *refs = self.embed([query, *others])
        return float((torch.stack(refs) @ q).max())

    def logits(self, question: str, image: Path | None) -> tuple[float, float]:
        match = self.pattern.fullmatch(question)
        if match is None:
            raise UserError(f"judge question {question[:80]!r} does not follow the configured template")
        if image is None:
            raise UserError("the captions judge judges caption → photo pairs; this candidate has no photo")
        return self.similarity(match.group(1), Path(image)), self.cut
