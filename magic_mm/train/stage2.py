"""Stage 2: contrastive training with InfoNCE over a mixture of sub-datasets.

Phase A (``steps``): in-batch negatives.  Phase B (``hard_negatives.steps``):
before its first step the current model embeds each sub-dataset's candidate pool
(its distinct positives), ranks it for every query of *that* sub-dataset with that
sub-dataset's instructions, and mined negatives (see ``mining.py``) join each
query's batch.  The ground truth stays each query's only positive.  Every batch comes
from one sub-dataset (see ``mixture.py``), so its in-batch negatives are of one task;
negatives a file lists itself (``neg_text`` / ``neg_image_path``) join the batch in
both phases.

On several processes every rank derives the same global batch (queries and
candidates) from ``(seed, step)``, embeds its contiguous share of each, and the
loss is taken over the all-gathered vectors (see ``distributed.py``).  Mining
embeds the pool the same way, a share of whole chunks per rank.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from magic_mm.data.mmeb import Item
from magic_mm.data.train_layout import TrainRow
from magic_mm.model.embedder import MagicEmbedder
from magic_mm.model.inputs import PreparedInput
from magic_mm.train import distributed
from magic_mm.train.gradcache import contrastive_backward
from magic_mm.train.loop import Trainer, lr_factor
from magic_mm.train.losses import caption_image_loss
from magic_mm.train.mining import mine_hard_negatives, positive_aware_caps
from magic_mm.train.mixture import Pool, TrainData, item_from_json, item_to_json

NEGATIVES_FILE = "hard_negatives.json"
IN_BATCH_MODEL = "model-in-batch"
MINING_QUERY_CHUNK = 1024  # queries ranked at a time (the score matrix is chunk × pool)

# sub-dataset name → file row → that query's mined (or judged) negatives
Negatives = dict[str, dict[int, list[Item]]]


def negatives_to_json(negatives: Negatives) -> dict[str, dict[str, list[dict[str, Any]]]]:
    return {name: {str(r): [item_to_json(i) for i in items] for r, items in rows.items()}
            for name, rows in negatives.items()}


def negatives_from_json(data: dict[str, Any]) -> Negatives:
    return {name: {int(r): [item_from_json(i) for i in items] for r, items in rows.items()}
            for name, rows in data.items()}


class ContrastiveTrainer(Trainer):
    """InfoNCE over query→positive pairs; stage 3 reuses it with judged negatives."""

    def build_model(self) -> MagicEmbedder:
        self.data = TrainData.from_config(self.config)
        self.negatives: Negatives = {}
        return self.load_embedder()

    def prepare_run(self) -> None:
        self.vision = self.build_vision_cache(self.data.image_paths() if self.config.cache_vision else [])
        path = self.out / NEGATIVES_FILE
        if path.is_file():
            self.negatives = negatives_from_json(json.loads(path.read_text()))

    # -- inputs ---------------------------------------------------------------------
    def side_input(self, item: Item) -> Any:
        """What the embedder takes for one side of a pair (a cached grid stands in for the image)."""
        if item.image is None:
            return item.text
        if self.config.cache_vision:
            return self.vision.item(item.image, item.text)
        return (item.image, item.text) if item.text else item.image

    def embed(self, items: Sequence[Any], role: str, instruction: str | None = None) -> torch.Tensor:
        return self.model_forward(self.embedder.prepare(items), role, instruction)

    def model_forward(self, items: list[PreparedInput], role: str, instruction: str | None) -> torch.Tensor:
        return self.model("embed_prepared", items, role, instruction)

    def embed_pool(self, items: Sequence[Any], role: str, instruction: str | None, chunk: int) -> torch.Tensor:
        """Vectors of all ``items`` (no grad), in order.  The chunks of ``chunk`` items are shared out
        whole among the ranks, so each vector is computed exactly as in one process."""
        starts = distributed.shard(range(0, len(items), chunk))
        with torch.no_grad():
            parts = [self.embed(items[s : s + chunk], role, instruction) for s in starts]
        return distributed.all_gather(torch.cat(parts) if parts else torch.zeros(0))

    def pool_scores(self, pool: Pool, queries: list[int]):  # noqa: ANN201
        """Scores (as chunks of ``MINING_QUERY_CHUNK`` query rows) of ``pool``'s queries at ``queries``
        against its whole candidate pool, with the sub-dataset's instructions."""
        q_instr, c_instr = self.data.instructions(pool.source)
        self.model.eval()
        c_vecs = self.embed_pool([self.side_input(c) for c in pool.candidates], "candidate", c_instr, 16)
        for start in range(0, len(queries), MINING_QUERY_CHUNK):
            chunk = queries[start : start + MINING_QUERY_CHUNK]
            q_vecs = self.embed_pool([self.side_input(pool.queries[q]) for q in chunk], "query", q_instr, 32)
            yield chunk, MagicEmbedder.similarity(q_vecs, c_vecs)

    # -- the schedule -----------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.config.steps + self.config.hard_negatives.steps

    def _lr_factor(self, step: int) -> float:
        hn, optim = self.config.hard_negatives, self.config.optim
        if hn.schedule == "continue":
            return super()._lr_factor(step)
        if step < self.config.steps:
            return lr_factor(step, self.config.steps, optim)
        return hn.lr_scale * lr_factor(step - self.config.steps, hn.steps, optim)

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
                (self.out / NEGATIVES_FILE).write_text(json.dumps(negatives_to_json(self.negatives)))

    def mine(self) -> Negatives:
        """Rank each sub-dataset's own pool for each of its (kept) queries with the current model."""
        hn = self.config.hard_negatives
        out: Negatives = {}
        for d, name in enumerate(self.data.names):
            if self.data.specs[d].weight <= 0:
                continue  # never drawn: nothing to mine for
            pool = self.data.pool(d, hn.queries_per_group)
            mined: dict[int, list[Item]] = {}
            groups = list(range(len(pool.candidates)))
            rng_seed = [self.config.seed, d]
            for n, (chunk, scores) in enumerate(self.pool_scores(pool, list(range(len(pool.rows))))):
                owners = [pool.owner[q] for q in chunk]  # each query's positive: a candidate index
                caps = None if hn.max_positive_ratio is None else positive_aware_caps(scores, owners, hn.max_positive_ratio)
                picks = mine_hard_negatives(scores, owners, groups, hn.window, hn.count, seed=rng_seed + [n],
                                            score_caps=caps)
                mined.update({pool.rows[q]: [pool.candidates[c] for c in m] for q, m in zip(chunk, picks)})
            out[name] = mined
        return out

    def negative_rows(self) -> list[list[int]]:
        """Each sub-dataset's rows that have negatives (sorted), for the hard-negative phase."""
        return [sorted(self.negatives.get(name, {})) for name in self.data.names]

    def step_batch(self, step: int) -> tuple[int, list[TrainRow]]:
        """(sub-dataset, query rows) of step ``step``."""
        if not self.uses_negatives(step):
            return self.data.batch(step, stream=0)
        first = 0 if self.uses_negatives(0) else self.config.steps
        return self.data.batch(step - first, stream=1, rows=self.negative_rows())

    def step_candidates(self, step: int, d: int, rows: list[TrainRow]) -> list[Item]:
        """The batch's candidates: positives first, then negatives (the file's own, then mined);
        each candidate once."""
        candidates: dict[Item, None] = {row.positive: None for row in rows}
        mined = self.negatives.get(self.data.names[d], {}) if self.uses_negatives(step) else {}
        for row in rows:
            for item in (*row.negatives, *mined.get(row.index, [])):
                candidates.setdefault(item, None)
        return list(candidates)

    def train_step(self, step: int) -> dict[str, Any]:
        cfg = self.config
        d, rows = self.step_batch(step)  # the global batch: every rank derives the same one
        candidates = self.step_candidates(step, d, rows)
        index = {item: n for n, item in enumerate(candidates)}
        targets = torch.tensor([index[row.positive] for row in rows])
        q_groups = targets.clone()  # a query's group is its positive
        c_groups = torch.arange(len(candidates))  # a candidate is its own group
        q_instr, c_instr = self.data.instructions(d)

        def loss_fn(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return caption_image_loss(q, c, targets, q_groups, c_groups, cfg.temperature, cfg.symmetric)

        loss = contrastive_backward(
            lambda items: self.embed(items, "query", q_instr),
            lambda items: self.embed(items, "candidate", c_instr),
            [self.side_input(row.query) for row in distributed.shard(rows)],  # this rank's shares
            [self.side_input(c) for c in distributed.shard(candidates)],
            loss_fn, cfg.grad_cache_chunk, self.backward, distributed.all_gather_with_grad,
        )
        return {"loss": loss, "candidates": float(len(candidates)),
                "hard_negative_phase": float(self.uses_negatives(step)), "dataset": self.data.names[d]}

