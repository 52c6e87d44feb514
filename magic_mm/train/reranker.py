"""Training ``MagicReranker`` (started from the stage-1 model).

Each query contributes two pointwise examples, (query, positive) → "Yes" and
(query, negative) → "No", scored by cross-entropy over the Yes/No logits, and one
listwise example: the positive among 2–5 negatives at a random slot, where the
model must write the positive's number.  The two losses are summed (weighted).

Positives are the ground truth plus, when ``reranker.candidates_from`` names a
stage-3 run, the items its judge found relevant; negatives are that run's judged
negatives, or random items of other groups otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from magic_mm.errors import UserError
from magic_mm.model.embedder import MagicEmbedder
from magic_mm.model.generative import IGNORE, answer_loss, build_batch
from magic_mm.model.inputs import PreparedInput
from magic_mm.model.reranker import MagicReranker
from magic_mm.train import distributed
from magic_mm.train.loop import FINAL_MODEL, Trainer, batch_indices
from magic_mm.train.pairs import CaptionPairs
from magic_mm.train.stage3 import JUDGEMENTS_FILE


class RerankerTrainer(Trainer):
    def build_model(self) -> MagicEmbedder:
        self.pairs = CaptionPairs.load(self.config.data)
        self.judged: dict[int, dict[str, list[int]]] = {}
        source = self.config.reranker.candidates_from
        if source:
            path = Path(source) / JUDGEMENTS_FILE if Path(source).is_dir() else Path(source)
            if not path.is_file():
                raise UserError(f"reranker.candidates_from {source!r}: no {JUDGEMENTS_FILE}; run stage 3 first")
            self.judged = {int(k): v for k, v in json.loads(path.read_text()).items()}
        self.queries = sorted(self.judged) if self.judged else list(range(len(self.pairs.captions)))
        return self.load_embedder()

    def prepare_run(self) -> None:
        self.vision = self.build_vision_cache(self.pairs.images)

    def candidate(self, index: int) -> PreparedInput:
        path = self.pairs.images[index]
        if self.config.cache_vision:
            return self.vision.item(path)
        return self.embedder.prepare([path])[0]

    def negatives(self, q: int, rng: np.random.Generator, count: int) -> list[int]:
        owner = self.pairs.owner[q]
        judged = self.judged.get(q, {})
        pool = [n for n in judged.get("negatives", []) if n != owner]
        if len(pool) < count:  # top up with random items of other groups
            others = [i for i in range(len(self.pairs.images)) if i != owner and i not in pool
                      and i not in judged.get("judged_relevant", [])]
            pool += [int(i) for i in rng.choice(others, size=min(count - len(pool), len(others)), replace=False)]
        return [int(i) for i in rng.permutation(pool)[:count]]

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        picks = batch_indices(len(self.queries), cfg.batch_size, step, cfg.seed)
        picks = distributed.shard(picks)  # this rank's share of the global batch
        reranker = MagicReranker(self.embedder)
        pointwise, labels, listwise = [], [], []
        for p in picks:
            q = self.queries[p]
            rng = np.random.default_rng([cfg.seed, step, q])
            query = self.embedder.prepare([self.pairs.captions[q]])[0]
            positives = [self.pairs.owner[q], *self.judged.get(q, {}).get("judged_relevant", [])]
            lo, hi = cfg.reranker.negatives
            negs = self.negatives(q, rng, int(rng.integers(lo, hi + 1)))
            pointwise += [reranker.pointwise_example(query, self.candidate(int(rng.choice(positives))), True),
                          reranker.pointwise_example(query, self.candidate(negs[0]), False)]
            labels += [0, 1]  # index into (yes, no)
            slot = int(rng.integers(0, len(negs) + 1))
            order = negs[:slot] + [self.pairs.owner[q]] + negs[slot:]
            listwise.append(reranker.listwise_example(query, [self.candidate(i) for i in order], slot))
        point_loss, list_loss, tokens = self._losses(reranker, pointwise, labels, listwise)
        # each loss is a mean over the global batch: pointwise over its examples, listwise over answer tokens
        point_share, point_value = self.share_of_mean(point_loss, len(pointwise))
        list_share, list_value = self.share_of_mean(list_loss, tokens)
        w_point, w_list = cfg.reranker.pointwise_weight, cfg.reranker.listwise_weight
        self.backward(w_point * point_share + w_list * list_share)
        return {"loss": w_point * point_value + w_list * list_value, "pointwise": point_value, "listwise": list_value}

    def _losses(self, reranker: MagicReranker, pointwise, labels, listwise) -> tuple[torch.Tensor, torch.Tensor, int]:  # noqa: ANN001
        yes_no = self.model(lambda _m, ex: reranker.yes_no(ex), pointwise)
        point_loss = F.cross_entropy(yes_no.float(), torch.tensor(labels, device=yes_no.device))
        batch = build_batch(self.embedder, listwise, eos=False)
        list_loss = self.model(answer_loss, batch)
        return point_loss, list_loss, int((batch.labels[:, 1:] != IGNORE).sum())

    def finish(self) -> Path:
        folder = self.out / FINAL_MODEL
        with self.full_params():
            if self.accelerator.is_main_process:
                MagicReranker(self.embedder).save_pretrained(folder)
        return folder
