"""Stage 1: generative restoration.

Next-token loss on the answer tokens only, over image→caption pairs (the
compressed visual tokens must carry enough to write the caption) and text-only
instructions from the config.  The connector is trained; the LM by LoRA, fully,
or not at all (``train_lm``).
"""

from __future__ import annotations

import torch

from magic_mm.model.embedder import MagicEmbedder
from magic_mm.model.generative import IGNORE, GenExample, answer_loss, build_batch
from magic_mm.train import distributed
from magic_mm.train.loop import Trainer, batch_indices
from magic_mm.train.pairs import CaptionPairs


class GenerativeTrainer(Trainer):
    def build_model(self) -> MagicEmbedder:
        self.pairs = CaptionPairs.load(self.config.data)
        cfg = self.config.stage1
        # (image index or None, prompt, answer): every caption, then the text instructions
        self.examples: list[tuple[int | None, str, str]] = [
            (self.pairs.owner[q], cfg.caption_prompt, caption) for q, caption in enumerate(self.pairs.captions)
        ] + [(None, t["prompt"], t["answer"]) for t in cfg.text_instructions]
        return self.load_embedder()

    def prepare_run(self) -> None:
        self.vision = self.build_vision_cache(self.pairs.images)

    def example(self, index: int) -> GenExample:
        image, prompt, answer = self.examples[index]
        tokenizer = self.embedder.backbone.tokenizer
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: self.config.stage1.max_answer_tokens]
        segments: list = []
        if image is not None:
            path = self.pairs.images[image]
            segments += [self.vision.grids[str(path)] if self.config.cache_vision else self.embedder.prepare([path])[0].image, "\n"]
        segments.append(prompt + "\n")
        return GenExample(segments, tokenizer.decode(ids))

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        picks = batch_indices(len(self.examples), cfg.batch_size, step, cfg.seed)
        loss, tokens = self._loss([self.example(i) for i in distributed.shard(picks)])  # this rank's share
        contribution, value = self.share_of_mean(loss, tokens)  # the global batch's token mean
        self.backward(contribution)
        return {"loss": value}

    def _loss(self, examples: list[GenExample]) -> tuple[torch.Tensor, int]:
        """Mean answer-token loss of ``examples`` and the number of answer tokens it averages."""
        batch = build_batch(self.embedder, examples)
        return self.model(answer_loss, batch), int((batch.labels[:, 1:] != IGNORE).sum())
