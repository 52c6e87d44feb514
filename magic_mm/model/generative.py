"""Generative use of an embedder's backbone: prompts with images → next-token logits.

Stage 1 (restoration), the judge (the project's own stage-1 model) and the
reranker all run the LM as a language model over a sequence of text pieces and
images.  Their batches are built by ``magic_mm.model.lm_batch``, like the
embedder's, so they get the same positions and decoder arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from magic_mm.model.lm_batch import IGNORE, LMBatch, build_lm_batch, hidden_states

if TYPE_CHECKING:
    from magic_mm.model.embedder import MagicEmbedder

@dataclass
class GenExample:
    """A prompt (texts and images in order) and an optional answer to learn."""

    segments: list[Any] = field(default_factory=list)  # str, or an image (PIL / cached VisionGrid)
    answer: str | None = None


def build_batch(model: MagicEmbedder, examples: list[GenExample], eos: bool = True) -> LMBatch:
    """The examples as one padded LM batch (answers appended, labelled; see ``lm_batch``)."""
    return build_lm_batch(model.backbone, [ex.segments for ex in examples], [ex.answer for ex in examples], eos)


def logits(model: MagicEmbedder, batch: LMBatch, positions: torch.Tensor | None = None) -> torch.Tensor:
    """LM logits ``(B, L, V)``, or ``(B, V)`` at one position per row when ``positions`` is given."""
    states = hidden_states(model.backbone, batch)
    if positions is not None:
        states = states[torch.arange(len(states), device=states.device), positions]
    return model.backbone.lm_head(states)


def answer_loss(model: MagicEmbedder, batch: LMBatch) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens (``batch.labels`` != IGNORE).

    Equal to ``answer_token_loss(logits(model, batch), batch.labels)``, but the LM head (a
    576 × 49k matrix for SmolLM2) runs only at the positions that predict an answer token,
    not at every prompt and visual token, which made it most of a reranker step's cost.
    """
    out, targets, _ = _answer_logits(model, batch)
    return torch.nn.functional.cross_entropy(out, targets)


def answer_log_likelihoods(model: MagicEmbedder, batch: LMBatch) -> torch.Tensor:
    """``(B,)`` log-probability of each row's whole answer (summed over its tokens)."""
    out, targets, predicts = _answer_logits(model, batch)
    token_ll = -torch.nn.functional.cross_entropy(out, targets, reduction="none")
    rows = predicts.nonzero()[:, 0]  # each answer token's row, in the same row-major order
    return torch.zeros(len(predicts), device=token_ll.device).index_add_(0, rows, token_ll)


def _answer_logits(model: MagicEmbedder, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 logits at the positions that predict an answer token, those tokens, and the
    ``(B, L - 1)`` mask of those positions."""
    states = hidden_states(model.backbone, batch)
    targets = batch.labels[:, 1:]
    predicts = targets != IGNORE  # position t predicts token t + 1
    return model.backbone.lm_head(states[:, :-1][predicts]).float(), targets[predicts], predicts


def token_id(model: MagicEmbedder, word: str) -> int:
    """The first token of ``word`` (e.g. "Yes"); the choice a yes/no head reads."""
    ids = model.backbone.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer has no token for {word!r}")
    return ids[0]


def yes_no_logits(model: MagicEmbedder, examples: list[GenExample], yes: str = "Yes", no: str = "No") -> torch.Tensor:
    """``(B, 2)`` logits of the yes / no tokens right after each prompt."""
    batch = build_batch(model, examples)
    out = logits(model, batch, batch.prompt_end)
    return out[:, [token_id(model, yes), token_id(model, no)]]
