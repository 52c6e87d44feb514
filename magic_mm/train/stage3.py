"""Stage 3: task-aware fine-tuning with an MLLM judge.

Once per run, the stage-2 model retrieves the top ``retrieve_top`` candidates for
each query; the ground truth and its group are set aside, and the judge labels
the rest.  Judged-relevant items are stored as extra positives *for the reranker
only* (``judgements.json``); the others, in rank order, are the query's hard
negatives (``hard_negatives`` of them).  Training is then InfoNCE with those
negatives, the ground truth staying the only positive.  Instructions come from
the per-task table in the config.

On several processes the pool is embedded in shares, and the judging (the costly
part) is shared out by query: every rank asks the judge about its share, keeps its
verdicts in its own cache file (rank 0's is ``judge.cache``; the others add
``.rankN``), and the verdicts are gathered so that every rank builds the same
negatives.
"""

from __future__ import annotations

import json

import numpy as np

from magic_mm.model.embedder import MagicEmbedder
from magic_mm.train import distributed
from magic_mm.train.judge import CachedJudge, SelfJudge, calibrated_threshold, make_judge
from magic_mm.train.mining import eligible_ranking
from magic_mm.train.stage2 import NEGATIVES_FILE, ContrastiveTrainer

JUDGEMENTS_FILE = "judgements.json"
CALIBRATION_FILE = "judge_calibration.json"


def sorted_sample(rng: np.random.Generator, items: list[int], n: int) -> list[int]:
    """``n`` of ``items`` (all when there are fewer) drawn without replacement, kept in their order."""
    return [items[i] for i in sorted(rng.choice(len(items), min(n, len(items)), replace=False))]


class JudgedTrainer(ContrastiveTrainer):
    @property
    def total_steps(self) -> int:
        return self.config.steps

    def uses_negatives(self, step: int) -> bool:
        return True

    def before_step(self, step: int) -> None:
        pass  # negatives come from the judge, built once in prepare_run

    def instructions(self) -> tuple[str | None, str | None]:
        table = self.config.stage3.instructions.get(self.config.stage3.task)
        if table is None:
            return None, None
        return table.get("query"), table.get("candidate")

    def prepare_run(self) -> None:
        super().prepare_run()
        if not self.negatives:
            judged = self.judge_pool()
            self.negatives = {q: j["negatives"] for q, j in judged.items()}
            if self.accelerator.is_main_process:
                (self.out / JUDGEMENTS_FILE).write_text(json.dumps(judged, indent=1))
                (self.out / NEGATIVES_FILE).write_text(json.dumps(self.negatives))

    def judge_pool(self) -> dict[int, dict[str, list[int]]]:
        cfg = self.config.stage3
        queries = self.pairs.queries_per_group(self.config.hard_negatives.queries_per_group)
        if cfg.max_queries is not None:
            queries = sorted_sample(np.random.default_rng([self.config.seed, 3]), queries, cfg.max_queries)
        q_instr, c_instr = self.instructions()
        self.model.eval()
        c_vecs = self.embed_pool([self.candidate_item(i) for i in range(len(self.pairs.images))], "candidate", c_instr, 16)
        q_vecs = self.embed_pool([self.pairs.captions[q] for q in queries], "query", q_instr, 32)
        scores = MagicEmbedder.similarity(q_vecs, c_vecs)
        made = make_judge(cfg.judge)
        if isinstance(made, SelfJudge) and made.model.config.backbone == self.embedder.config.backbone:
            made.grids = self.vision.grids  # same frozen vision encoder: reuse its cached grids
        judge = CachedJudge(made, self._cache_path())
        if not distributed.is_main():  # a rank writes only its own file, and reads rank 0's too
            judge.verdicts.update(CachedJudge(made, self._cache_path(0)).verdicts)
        threshold = self.calibrate(judge, queries) if cfg.judge.calibrate else 0.0
        groups = list(range(len(self.pairs.images)))
        tops = [eligible_ranking(row, self.pairs.owner[q], groups)[: cfg.retrieve_top] for row, q in zip(scores, queries)]
        questions = [cfg.judge.question.format(query=self.pairs.captions[q]) for q in queries]
        mine = distributed.shard(range(len(queries)))
        margins = [[v.margin for v in judge.many(questions[i], [self.pairs.images[c] for c in tops[i]])] for i in mine]
        margins = [m for share in distributed.all_gather_objects(margins) for m in share]
        out: dict[int, dict[str, list[int]]] = {}
        for q, top, margin in zip(queries, tops, margins):
            relevant = [int(c) for c, m in zip(top, margin) if m > threshold]
            others = [int(c) for c in top if int(c) not in relevant]
            out[q] = {"positive": [self.pairs.owner[q]], "judged_relevant": relevant,
                      "negatives": others[: cfg.hard_negatives]}
        return out

    def calibrate(self, judge: CachedJudge, queries: list[int]) -> float:
        """The judge's decision threshold from known pairs: each sampled query with its own image
        (a match) and with a random image of another group (a mismatch)."""
        cfg = self.config.stage3.judge
        rng = np.random.default_rng([self.config.seed, 4])
        picked = sorted_sample(rng, queries, cfg.calibrate)
        pairs = []
        for q in picked:
            owner = self.pairs.owner[q]
            other = int(rng.choice([i for i in range(len(self.pairs.images)) if i != owner]))
            pairs.append((cfg.question.format(query=self.pairs.captions[q]), owner, other))
        asked = [judge.many(question, [self.pairs.images[owner], self.pairs.images[other]])
                 for question, owner, other in distributed.shard(pairs)]
        verdicts = [v for share in distributed.all_gather_objects(asked) for v in share]
        matched = [match for match, _ in verdicts]
        mismatched = [mismatch for _, mismatch in verdicts]
        threshold, accuracy = calibrated_threshold(matched, mismatched)
        report = {"pairs": len(picked), "threshold": threshold, "accuracy": accuracy,
                  "yes_rate_at_0": sum(v.relevant for v in matched + mismatched) / (2 * len(picked)),
                  "mean_margin_matched": float(np.mean([v.margin for v in matched])),
                  "mean_margin_mismatched": float(np.mean([v.margin for v in mismatched]))}
        if self.accelerator.is_main_process:
            (self.out / CALIBRATION_FILE).write_text(json.dumps(report, indent=1))
        return threshold

    def _cache_path(self, rank: int | None = None):  # noqa: ANN202
        from pathlib import Path

        path = Path(self.config.stage3.judge.cache)
        path = path if path.is_absolute() else self.out / path
        rank = distributed.rank() if rank is None else rank
        return path if rank == 0 else path.with_name(f"{path.name}.rank{rank}")
