"""Generative use of an embedder's backbone: prompts with images → next-token logits.

Stage 1 (restoration), the judge (the project's own stage-1 model) and the
reranker all run the LM as a language model over a sequence of text pieces and
images.  This module is the one place that assembles such sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from magic_mm.model.embedder import MagicEmbedder

IGNORE = -100


@dataclass
class GenExample:
    """A prompt (texts and images in order) and an optional answer to learn."""

    segments: list[Any] = field(default_factory=list)  # str, or an image (PIL / cached grid tensor)
    answer: str | None = None


@dataclass
class GenBatch:
    embeds: torch.Tensor  # (B, L, D), right-padded
    mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L): answer token ids, IGNORE elsewhere
    prompt_end: torch.Tensor  # (B,): index of each prompt's last token (its logits predict the answer)


def build_batch(model: MagicEmbedder, examples: list[GenExample], eos: bool = True) -> GenBatch:
    """Embed every example's segments (images through compression + connector) and pad."""
    backbone = model.backbone
    images = [s for ex in examples for s in ex.segments if not isinstance(s, str)]
    encoded = iter(backbone.encode_images(images) if images else [])
    sequences, labels, ends = [], [], []
    for ex in examples:
        pieces: list[torch.Tensor] = []
        for seg in ex.segments:
            if isinstance(seg, str):
                pieces.append(_tokens(model, seg))
            else:
                before, after = backbone.image_wrap
                pieces += [_tokens(model, before), next(encoded), _tokens(model, after)]
        prompt = torch.cat([p for p in pieces if len(p)])
        answer_ids: list[int] = []
        if ex.answer is not None:
            answer_ids = backbone.tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
            if eos and backbone.tokenizer.eos_token_id is not None:
                answer_ids = answer_ids + [backbone.tokenizer.eos_token_id]
        answer = backbone.embed_tokens(torch.tensor(answer_ids, dtype=torch.long, device=backbone.device))
        sequences.append(torch.cat([prompt, answer]))
        labels.append([IGNORE] * len(prompt) + answer_ids)
        ends.append(len(prompt) - 1)
    longest = max(len(s) for s in sequences)
    embeds = sequences[0].new_zeros(len(sequences), longest, sequences[0].shape[-1])
    mask = torch.zeros(len(sequences), longest, dtype=torch.long, device=backbone.device)
    label_t = torch.full((len(sequences), longest), IGNORE, dtype=torch.long, device=backbone.device)
    for i, (seq, lab) in enumerate(zip(sequences, labels)):
        embeds[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return GenBatch(embeds, mask, label_t, torch.tensor(ends, device=backbone.device))


def _tokens(model: MagicEmbedder, text: str) -> torch.Tensor:
    backbone = model.backbone
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return backbone.embed_tokens(torch.tensor(ids, dtype=torch.long, device=backbone.device))


def logits(model: MagicEmbedder, batch: GenBatch, positions: torch.Tensor | None = None) -> torch.Tensor:
    """LM logits ``(B, L, V)``, or ``(B, V)`` at one position per row when ``positions`` is given."""
    states = model.backbone.decoder(inputs_embeds=batch.embeds, attention_mask=batch.mask).last_hidden_state
    if positions is not None:
        states = states[torch.arange(len(states), device=states.device), positions]
    return model.backbone.lm_head(states)


def answer_loss(model: MagicEmbedder, batch: GenBatch) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens (``batch.labels`` != -100).

    Equal to ``answer_token_loss(logits(model, batch), batch.labels)``, but the LM head (a
    576 × 49k matrix for SmolLM2) runs only at the positions that predict an answer token,
    not at every prompt and visual token, which made it most of a reranker step's cost.
    """
    states = model.backbone.decoder(inputs_embeds=batch.embeds, attention_mask=batch.mask).last_hidden_state
    targets = batch.labels[:, 1:]
    predicts = targets != -100  # position t predicts token t + 1
    out = model.backbone.lm_head(states[:, :-1][predicts])
    return torch.nn.functional.cross_entropy(out.float(), targets[predicts])


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
