"""Stage 2: contrastive training with InfoNCE.

Phase A (``steps``): in-batch negatives.  Phase B (``hard_negatives.steps``):
before its first step the current model embeds the whole candidate pool, ranks it
for every query, and mined negatives (see ``mining.py``) join each query's batch.
The ground truth stays each query's only positive.

On several processes every rank derives the same global batch (queries and
candidates) from ``(seed, step)``, embeds its contiguous share of each, and the
loss is taken over the all-gathered vectors (see ``distributed.py``).  Mining
embeds the pool the same way, a share of whole chunks per rank.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from magic_mm.model.embedder import MagicEmbedder
from magic_mm.model.inputs import PreparedInput
from magic_mm.train import distributed
from magic_mm.train.gradcache import contrastive_backward
from magic_mm.train.loop import Trainer, batch_indices
from magic_mm.train.losses import caption_image_loss
from magic_mm.train.mining import mine_hard_negatives
from magic_mm.train.pairs import CaptionPairs

NEGATIVES_FILE = "hard_negatives.json"
IN_BATCH_MODEL = "model-in-batch"


class ContrastiveTrainer(Trainer):
    """InfoNCE over caption→image pairs; stage 3 reuses it with judged negatives."""

    def build_model(self) -> MagicEmbedder:
        self.pairs = CaptionPairs.load(self.config.data)
        self.negatives: dict[int, list[int]] = {}
        return self.load_embedder()

    def prepare_run(self) -> None:
        self.vision = self.build_vision_cache(self.pairs.images)
        path = self.out / NEGATIVES_FILE
        if path.is_file():
            self.negatives = {int(k): v for k, v in json.loads(path.read_text()).items()}

    # -- inputs ---------------------------------------------------------------------
    def candidate_item(self, index: int) -> Any:
        path = self.pairs.images[index]
        return self.vision.item(path) if self.config.cache_vision else path

    def embed(self, items: Sequence[Any], role: str, instruction: str | None = None) -> torch.Tensor:
        return self.model_forward(self.embedder.prepare(items), role, instruction)

    def model_forward(self, items: list[PreparedInput], role: str, instruction: str | None) -> torch.Tensor:
        return self.model("embed_prepared", items, role, instruction)

    def instructions(self) -> tuple[str | None, str | None]:
        return None, None  # the model config's defaults

    def embed_pool(self, items: Sequence[Any], role: str, instruction: str | None, chunk: int) -> torch.Tensor:
        """Vectors of all ``items`` (no grad), in order.  The chunks of ``chunk`` items are shared out
        whole among the ranks, so each vector is computed exactly as in one process."""
        starts = distributed.shard(range(0, len(items), chunk))
        with torch.no_grad():
            parts = [self.embed(items[s : s + chunk], role, instruction) for s in starts]
        return distributed.all_gather(torch.cat(parts) if parts else torch.zeros(0))

    # -- the schedule -----------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.config.steps + self.config.hard_negatives.steps

    def uses_negatives(self, step: int) -> bool:
        """Whether step ``step`` adds each query's mined negatives to the batch."""
        return step >= self.config.steps

    def before_step(self, step: int) -> None:
        if step == self.config.steps and self.config.hard_negatives.steps and not self.negatives:
            with self.full_params():
                if self.accelerator.is_main_process:  # the in-batch-only model, kept for comparison
                    self.embedder.save_pretrained(self.out / IN_BATCH_MODEL)
            self.negatives = self.mine()
            if self.accelerator.is_main_process:
                (self.out / NEGATIVES_FILE).write_text(json.dumps(self.negatives))

    def mine(self) -> dict[int, list[int]]:
        """Rank the whole pool for each (kept) query with the current model."""
        hn = self.config.hard_negatives
        queries = self.pairs.queries_per_group(hn.queries_per_group)
        q_instr, c_instr = self.instructions()
        self.model.eval()
        c_vecs = self.embed_pool([self.candidate_item(i) for i in range(len(self.pairs.images))], "candidate", c_instr, 16)
        q_vecs = self.embed_pool([self.pairs.captions[q] for q in queries], "query", q_instr, 32)
        scores = MagicEmbedder.similarity(q_vecs, c_vecs)
        mined = mine_hard_negatives(scores, [self.pairs.owner[q] for q in queries],
                                    list(range(len(self.pairs.images))), hn.window, hn.count, seed=self.config.seed)
        return {q: m for q, m in zip(queries, mined)}

    def step_queries(self, step: int) -> list[int]:
        cfg = self.config
        if not self.uses_negatives(step):
            return batch_indices(len(self.pairs.captions), cfg.batch_size, step, cfg.seed, stream=0)
        pool = sorted(self.negatives)
        first = 0 if self.uses_negatives(0) else cfg.steps
        picks = batch_indices(len(pool), cfg.batch_size, step - first, cfg.seed, stream=1)
        return [pool[i] for i in picks]

    def step_candidates(self, step: int, queries: list[int]) -> list[int]:
        """The batch's candidate images: positives first, then negatives; each image once."""
        candidates: list[int] = []
        for q in queries:  # positives first, then negatives; each image once
            if self.pairs.owner[q] not in candidates:
                candidates.append(self.pairs.owner[q])
        for q in queries:
            for n in self.negatives.get(q, []) if self.uses_negatives(step) else []:
                if n not in candidates:
                    candidates.append(n)
        return candidates

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        queries = self.step_queries(step)  # the global batch: every rank derives the same one
        candidates = self.step_candidates(step, queries)
        targets = torch.tensor([candidates.index(self.pairs.owner[q]) for q in queries])
        q_groups = torch.tensor([self.pairs.owner[q] for q in queries])
        c_groups = torch.tensor(candidates)  # a candidate image is its own group
        q_instr, c_instr = self.instructions()

        def loss_fn(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return caption_image_loss(q, c, targets, q_groups, c_groups, cfg.temperature, cfg.symmetric)

        loss = contrastive_backward(
            lambda items: self.embed(items, "query", q_instr),
            lambda items: self.embed(items, "candidate", c_instr),
            [self.pairs.captions[q] for q in distributed.shard(queries)],  # this rank's shares
            [self.candidate_item(c) for c in distributed.shard(candidates)],
            loss_fn, cfg.grad_cache_chunk, self.backward, distributed.all_gather_with_grad,
        )
        return {"loss": loss, "candidates": float(len(candidates)),
                "hard_negative_phase": float(self.uses_negatives(step))}
