"""Training ``MagicReranker`` (started from the stage-1 model).

Each query contributes two pointwise examples, (query, positive) → "Yes" and
(query, negative) → "No", scored by cross-entropy over the Yes/No logits, and one
listwise example: the positive among 2–5 negatives at a random slot, where the
model must write the positive's number.  The two losses are summed (weighted).

Batches come from the mixture like every stage's (one sub-dataset per batch).
Positives are the ground truth plus, when ``reranker.candidates_from`` names a
stage-3 run, the items its judge found relevant; negatives are that run's judged
negatives, topped up with the positives of other rows of the query's own block of
its sub-dataset (random, never the query's positive or a judged-relevant item).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from magic_mm.data.mmeb import Item
from magic_mm.data.train_layout import TrainRow
from magic_mm.errors import UserError
from magic_mm.model.embedder import MagicEmbedder
from magic_mm.model.generative import IGNORE, answer_loss, build_batch
from magic_mm.model.inputs import PreparedInput
from magic_mm.model.reranker import MagicReranker
from magic_mm.train import distributed
from magic_mm.train.loop import FINAL_MODEL, Trainer
from magic_mm.train.mixture import TrainData, item_from_json
from magic_mm.train.stage3 import JUDGEMENTS_FILE

Judged = dict[str, dict[int, dict[str, list[Item]]]]  # sub-dataset → row → positive / judged_relevant / negatives


class RerankerTrainer(Trainer):
    def build_model(self) -> MagicEmbedder:
        self.data = TrainData.from_config(self.config)
        self.judged: Judged = {}
        source = self.config.reranker.candidates_from
        if source:
            path = Path(source) / JUDGEMENTS_FILE if Path(source).is_dir() else Path(source)
            if not path.is_file():
                raise UserError(f"reranker.candidates_from {source!r}: no {JUDGEMENTS_FILE}; run stage 3 first")
            raw = json.loads(path.read_text())
            unknown = sorted(set(raw) - set(self.data.names))
            if unknown:
                raise UserError(f"{path}: judged sub-dataset(s) {', '.join(unknown)} are not in this config's "
                                f"data ({', '.join(self.data.names)}); train the reranker on the stage-3 run's data")
            self.judged = {name: {int(r): {k: [item_from_json(i) for i in v] for k, v in j.items()}
                                  for r, j in rows.items()} for name, rows in raw.items()}
        # with judgements: only the judged rows of each sub-dataset; otherwise every row
        self.rows = [sorted(self.judged.get(name, {})) for name in self.data.names] if self.judged else None
        return self.load_embedder()

    def prepare_run(self) -> None:
        self.vision = self.build_vision_cache(self.data.image_paths() if self.config.cache_vision else [])

    def candidate(self, item: Item) -> PreparedInput:
        if item.image is not None and self.config.cache_vision:
            return self.vision.item(item.image, item.text)
        return self.embedder.prepare([self.side(item)])[0]

    def side(self, item: Item) -> Any:
        if item.image is None:
            return item.text
        return (item.image, item.text) if item.text else item.image

    def negatives(self, d: int, row: TrainRow, rng: np.random.Generator, count: int) -> list[Item]:
        judged = self.judged.get(self.data.names[d], {}).get(row.index, {})
        relevant = set(judged.get("judged_relevant", []))
        pool = [n for n in dict.fromkeys(judged.get("negatives", [])) if n != row.positive]
        if len(pool) < count:  # top up with the positives of other rows of the row's block
            reader = self.data.readers[d]
            block = reader.block(reader.block_of(row.index))
            others = list(dict.fromkeys(r.positive for r in block if r.positive != row.positive
                                        and r.positive not in relevant and r.positive not in pool))
            take = min(count - len(pool), len(others))
            pool += [others[i] for i in rng.choice(len(others), size=take, replace=False)] if take else []
        return [pool[i] for i in rng.permutation(len(pool))[:count]]

    def train_step(self, step: int) -> dict[str, Any]:
        cfg = self.config
        d, rows = self.data.batch(step, rows=self.rows)
        mine = distributed.shard(rows)  # this rank's share of the global batch
        reranker = MagicReranker(self.embedder)
        pointwise, labels, listwise = [], [], []
        for row in mine:
            rng = np.random.default_rng([cfg.seed, step, d, row.index])
            query = self.embedder.prepare([self.side(row.query)])[0] if row.query.image is None or not cfg.cache_vision \
                else self.vision.item(row.query.image, row.query.text)
            positives = [row.positive, *self.judged.get(self.data.names[d], {}).get(row.index, {}).get("judged_relevant", [])]
            lo, hi = cfg.reranker.negatives
            negs = self.negatives(d, row, rng, int(rng.integers(lo, hi + 1)))
            if not negs:
                raise UserError(f"sub-dataset {self.data.names[d]!r}: row {row.index} has no other positive to use "
                                "as a negative; the reranker needs sub-datasets with at least two distinct positives")
            pointwise += [reranker.pointwise_example(query, self.candidate(positives[int(rng.integers(len(positives)))]), True),
                          reranker.pointwise_example(query, self.candidate(negs[0]), False)]
            labels += [0, 1]  # index into (yes, no)
            slot = int(rng.integers(0, len(negs) + 1))
            order = negs[:slot] + [row.positive] + negs[slot:]
            listwise.append(reranker.listwise_example(query, [self.candidate(i) for i in order], slot))
        point_loss, list_loss, tokens = self._losses(reranker, pointwise, labels, listwise)
        # each loss is a mean over the global batch: pointwise over its examples, listwise over answer tokens
        point_share, point_value = self.share_of_mean(point_loss, len(pointwise))
        list_share, list_value = self.share_of_mean(list_loss, tokens)
        w_point, w_list = cfg.reranker.pointwise_weight, cfg.reranker.listwise_weight
        self.backward(w_point * point_share + w_list * list_share)
        return {"loss": w_point * point_value + w_list * list_value, "pointwise": point_value, "listwise": list_value,
                "dataset": self.data.names[d]}

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
