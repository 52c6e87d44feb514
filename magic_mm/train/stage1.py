"""Stage 1: generative restoration over a mixture of data kinds.

Next-token loss on the answer tokens only.  Each sub-dataset of the mixture has a
*kind*, with its own prompt (``prompt``, else the kind's default) and its weight:

- ``caption`` (image → text): the row's image (query side, else positive side) and the
  prompt; the answer is the text on the other side (a caption folder: its caption);
- ``instruction`` (image + question → answer): the query image, the prompt with ``{text}``
  replaced by the query text (the question); the answer is ``pos_text``;
- ``text`` (text → continuation): no image; the prompt with ``{text}`` replaced by the
  query text; the answer is ``pos_text``.

The compressed visual tokens must carry enough to write the answer.  The connector is
trained; the LM by LoRA, fully, or not at all (``train_lm``).
"""

from __future__ import annotations

from typing import Any

import torch

from magic_mm.data.train_layout import KIND_PROMPTS, TrainDataError, TrainRow, guess_kind
from magic_mm.model.embedder import MagicEmbedder
from magic_mm.model.generative import IGNORE, GenExample, answer_loss, build_batch
from magic_mm.train import distributed
from magic_mm.train.loop import Trainer
from magic_mm.train.mixture import TrainData


class GenerativeTrainer(Trainer):
    def build_model(self) -> MagicEmbedder:
        self.data = TrainData.from_config(self.config)
        self.kinds = [spec.kind or guess_kind(reader.rows([0])[0]) for spec, reader in zip(self.data.specs, self.data.readers)]
        return self.load_embedder()

    def prepare_run(self) -> None:
        self.vision = self.build_vision_cache(self.data.image_paths() if self.config.cache_vision else [])

    def prompt(self, d: int) -> str:
        spec = self.data.specs[d]
        if spec.prompt is not None:
            return spec.prompt
        return self.config.stage1.caption_prompt if self.kinds[d] == "caption" else KIND_PROMPTS[self.kinds[d]]

    def parts(self, d: int, row: TrainRow) -> tuple[Any, str, str]:
        """(image path or None, prompt, answer) of ``row`` as sub-dataset ``d``'s kind."""
        kind, reader = self.kinds[d], self.data.readers[d]
        where = f"{reader.path}, row {row.index} (sub-dataset {reader.name!r}, kind {kind})"
        if kind == "caption":
            image, answer = ((row.query.image, row.positive.text) if row.query.image is not None
                             else (row.positive.image, row.query.text))
            if image is None or answer is None:
                raise TrainDataError(f"{where}: a caption row needs an image on one side and a text on the other; "
                                     "fix the row or set this sub-dataset's kind")
            return image, self.prompt(d), answer
        question, answer = row.query.text, row.positive.text
        if answer is None or (kind == "instruction" and (row.query.image is None or question is None)) or \
                (kind == "text" and question is None):
            need = "a query image, a question (qry) and an answer (pos_text)" if kind == "instruction" \
                else "a query text (qry) and its continuation (pos_text)"
            raise TrainDataError(f"{where}: needs {need}; fix the row or set this sub-dataset's kind")
        image = row.query.image if kind == "instruction" else None
        return image, self.prompt(d).replace("{text}", question), answer

    def example(self, d: int, row: TrainRow) -> GenExample:
        image, prompt, answer = self.parts(d, row)
        tokenizer = self.embedder.backbone.tokenizer
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: self.config.stage1.max_answer_tokens]
        segments: list = []
        if image is not None:
            picture = self.vision.grids[str(image)] if self.config.cache_vision else self.embedder.prepare([image])[0].image
            segments += [picture, "\n"]
        segments.append(prompt + "\n")
        return GenExample(segments, tokenizer.decode(ids))

    def train_step(self, step: int) -> dict[str, Any]:
        d, rows = self.data.batch(step)  # the global batch: one sub-dataset, the same on every rank
        loss, tokens = self._loss([self.example(d, row) for row in distributed.shard(rows)])  # this rank's share
        contribution, value = self.share_of_mean(loss, tokens)  # the global batch's token mean
        self.backward(contribution)
        return {"loss": value, "dataset": self.data.names[d]}

    def _loss(self, examples: list[GenExample]) -> tuple[torch.Tensor, int]:
        """Mean answer-token loss of ``examples`` and the number of answer tokens it averages."""
        batch = build_batch(self.embedder, examples)
        return self.model(answer_loss, batch), int((batch.labels[:, 1:] != IGNORE).sum())
