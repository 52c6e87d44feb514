"""Stage 3: task-aware fine-tuning with an MLLM judge, per sub-dataset.

Once per run, for each sub-dataset of the mixture, the stage-2 model retrieves the
top ``retrieve_top`` candidates of *that sub-dataset's* pool for each of its queries
(with its instructions); the ground truth is set aside, and the judge labels the rest
with that sub-dataset's question (``judge_question``, else ``stage3.judge.question``;
``{query}`` and ``{candidate}`` stand for the two texts).  The judge sees the
candidate's image, or the query's when the candidate is a text.  Judged-relevant items
are stored as extra positives *for the reranker only* (``judgements.json``); the others,
in rank order, are the query's hard negatives (``hard_negatives`` of them).  Training is
then InfoNCE with those negatives, the ground truth staying the only positive.

On several processes the pool is embedded in shares, and the judging (the costly
part) is shared out by query: every rank asks the judge about its share, keeps its
verdicts in its own cache file (rank 0's is ``judge.cache``; the others add
``.rankN``), and the verdicts are gathered so that every rank builds the same
negatives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from magic_mm.data.mmeb import Item
from magic_mm.train import distributed
from magic_mm.train.judge import CachedJudge, SelfJudge, Verdict, calibrated_threshold, make_judge
from magic_mm.train.mining import eligible_ranking
from magic_mm.train.mixture import Pool, item_to_json
from magic_mm.train.stage2 import NEGATIVES_FILE, ContrastiveTrainer, negatives_from_json, negatives_to_json

JUDGEMENTS_FILE = "judgements.json"
CALIBRATION_FILE = "judge_calibration.json"


def sorted_sample(rng: np.random.Generator, items: list[int], n: int) -> list[int]:
    """``n`` of ``items`` (all when there are fewer) drawn without replacement, kept in their order."""
    return [items[i] for i in sorted(rng.choice(len(items), min(n, len(items)), replace=False))]


def judge_question(template: str, query: Item, candidate: Item) -> str:
    """The judge's question about one (query, candidate) pair; ``{query}`` / ``{candidate}`` are their texts."""
    return template.replace("{query}", query.text or "").replace("{candidate}", candidate.text or "")


def judge_many(judge: CachedJudge, template: str, query: Item, candidates: list[Item]) -> list[Verdict]:
    """Verdicts on each candidate for ``query``: one judge call per distinct question (one in all when the
    candidates are images, whose texts do not enter the question)."""
    asks = [(judge_question(template, query, c), c.image if c.image is not None else query.image) for c in candidates]
    verdicts: dict[int, Verdict] = {}
    for question in dict.fromkeys(q for q, _ in asks):
        slots = [n for n, (q, _) in enumerate(asks) if q == question]
        for n, v in zip(slots, judge.many(question, [asks[n][1] for n in slots])):
            verdicts[n] = v
    return [verdicts[n] for n in range(len(candidates))]


class JudgedTrainer(ContrastiveTrainer):
    @property
    def total_steps(self) -> int:
        return self.config.steps

    def uses_negatives(self, step: int) -> bool:
        return True

    def before_step(self, step: int) -> None:
        pass  # negatives come from the judge, built once in prepare_run

    def instructions(self, d: int = 0) -> tuple[str | None, str | None]:
        """Sub-dataset ``d``'s (query, candidate) instructions."""
        return self.data.instructions(d)

    def prepare_run(self) -> None:
        super().prepare_run()
        if not self.negatives:
            judged = self.judge_pools()
            self.negatives = negatives_from_json({name: {r: j["negatives"] for r, j in rows.items()}
                                                  for name, rows in judged.items()})
            if self.accelerator.is_main_process:
                (self.out / JUDGEMENTS_FILE).write_text(json.dumps(judged, indent=1))
                (self.out / NEGATIVES_FILE).write_text(json.dumps(negatives_to_json(self.negatives)))

    def judge_pools(self) -> dict[str, dict[str, dict[str, list[dict[str, Any]]]]]:
        """Judge each sub-dataset's queries against its own pool → {name: {row: judgement}}."""
        cfg = self.config.stage3
        made = make_judge(cfg.judge)
        if isinstance(made, SelfJudge) and made.model.config.backbone == self.embedder.config.backbone:
            made.grids = self.vision.grids  # same frozen vision encoder: reuse its cached grids
        judge = CachedJudge(made, self._cache_path())
        if not distributed.is_main():  # a rank writes only its own file, and reads rank 0's too
            judge.verdicts.update(CachedJudge(made, self._cache_path(0)).verdicts)
        pools, picked = [], []
        for d in range(len(self.data.names)):
            if self.data.specs[d].weight <= 0:
                continue
            pool = self.data.pool(d, self.config.hard_negatives.queries_per_group)
            queries = list(range(len(pool.rows)))
            if cfg.max_queries is not None:
                queries = sorted_sample(np.random.default_rng([self.config.seed, 3, d]), queries, cfg.max_queries)
            pools.append(pool)
            picked.append(queries)
        threshold = self.calibrate(judge, pools, picked) if cfg.judge.calibrate else 0.0
        out: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
        for pool, queries in zip(pools, picked):
            out[self.data.names[pool.source]] = self.judge_pool(judge, pool, queries, threshold)
        return out

    def judge_pool(self, judge: CachedJudge, pool: Pool, queries: list[int],
                   threshold: float) -> dict[str, dict[str, list[dict[str, Any]]]]:
        cfg = self.config.stage3
        template = self.data.judge_question(pool.source)
        groups = list(range(len(pool.candidates)))
        out = {}
        for chunk, scores in self.pool_scores(pool, queries):
            tops = [eligible_ranking(row, pool.owner[q], groups)[: cfg.retrieve_top] for row, q in zip(scores, chunk)]
            mine = distributed.shard(range(len(chunk)))
            margins = [[v.margin for v in judge_many(judge, template, pool.queries[chunk[i]],
                                                     [pool.candidates[c] for c in tops[i]])] for i in mine]
            margins = [m for share in distributed.all_gather_objects(margins) for m in share]
            for q, top, margin in zip(chunk, tops, margins):
                relevant = [int(c) for c, m in zip(top, margin) if m > threshold]
                others = [int(c) for c in top if int(c) not in relevant]
                out[str(pool.rows[q])] = {
                    "positive": [item_to_json(pool.candidates[pool.owner[q]])],
                    "judged_relevant": [item_to_json(pool.candidates[c]) for c in relevant],
                    "negatives": [item_to_json(pool.candidates[c]) for c in others[: cfg.hard_negatives]]}
        return out

    def calibrate(self, judge: CachedJudge, pools: list[Pool], picked: list[list[int]]) -> float:
        """The judge's decision threshold from known pairs: sampled queries (over every sub-dataset)
        each with its own positive (a match) and with a random other candidate of its pool (a mismatch)."""
        cfg = self.config.stage3.judge
        rng = np.random.default_rng([self.config.seed, 4])
        everyone = [(p, q) for p, queries in enumerate(picked) for q in queries]
        chosen = [everyone[i] for i in sorted_sample(rng, list(range(len(everyone))), cfg.calibrate)]
        pairs = []
        for p, q in chosen:
            pool = pools[p]
            owner = pool.owner[q]
            others = [i for i in range(len(pool.candidates)) if i != owner]
            if not others:
                continue
            other = int(rng.choice(others))
            pairs.append((self.data.judge_question(pool.source), pool.queries[q],
                          pool.candidates[owner], pool.candidates[other]))
        asked = [judge_many(judge, template, query, [match, mismatch])
                 for template, query, match, mismatch in distributed.shard(pairs)]
        verdicts = [v for share in distributed.all_gather_objects(asked) for v in share]
        matched = [match for match, _ in verdicts]
        mismatched = [mismatch for _, mismatch in verdicts]
        threshold, accuracy = calibrated_threshold(matched, mismatched)
        report = {"pairs": len(pairs), "threshold": threshold, "accuracy": accuracy,
                  "yes_rate_at_0": sum(v.relevant for v in matched + mismatched) / (2 * len(pairs)),
                  "mean_margin_matched": float(np.mean([v.margin for v in matched])),
                  "mean_margin_mismatched": float(np.mean([v.margin for v in mismatched]))}
        if self.accelerator.is_main_process:
            (self.out / CALIBRATION_FILE).write_text(json.dumps(report, indent=1))
        return threshold

    def _cache_path(self, rank: int | None = None) -> Path:
        path = Path(self.config.stage3.judge.cache)
        path = path if path.is_absolute() else self.out / path
        rank = distributed.rank() if rank is None else rank
        return path if rank == 0 else path.with_name(f"{path.name}.rank{rank}")

