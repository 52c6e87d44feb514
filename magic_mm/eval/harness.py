"""The evaluation harness: tasks → unique items → cached embeddings → rankings → metrics.

Each distinct query and candidate of a task is embedded once (``Item`` is
hashable), through a ``CachedEncoder`` that reuses vectors from earlier runs.
``local`` mode ranks each query's own candidates (MMEB's protocol); ``global``
ranks every query against the de-duplicated pool of all candidates of the task,
with the query's own positives (and their grades) as the relevant ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from magic_mm.data.mmeb import Item, TaskRow
from magic_mm.errors import UserError
from magic_mm.eval.cache import CachedEncoder, EmbeddingCache
from magic_mm.eval.metrics import (DEFAULT_KS, NDCG_K, TIES, Ties, first_relevant_rank, mean_metrics, metric_names,
                                   query_metrics, rank_order)
from magic_mm.eval.tasks import META_TASKS, TaskSpec
from magic_mm.model.compression import Compression
from magic_mm.model.config import DEFAULT_MODEL_FOLDER, DEFAULT_MODEL_NAME, read_folder_config
from magic_mm.model.prompts import DEFAULT_INSTRUCTIONS

TOP_SHOWN = 5  # predictions kept per query in the task JSON


@dataclass
class EvalSettings:
    model: str = DEFAULT_MODEL_NAME
    compression: str | None = None  # None: the model's own setting
    batch_size: int = 16
    cache_root: Path | None = None  # None: the user cache folder
    use_cache: bool = True
    ks: tuple[int, ...] = DEFAULT_KS
    ties: Ties = "pessimistic"
    rerank: bool = False
    show_progress: bool = False
    dtype: str = "auto"  # see magic_mm.model.dtypes; the embedding cache is kept per resolved dtype
    device: str = "cpu"  # or "auto", "cuda", "cuda:N"; it changes what dtype "auto" resolves to


@dataclass
class TaskResult:
    name: str
    meta: str
    distribution: str | None
    mode: str
    primary: str
    score: float
    metrics: dict[str, float]
    counts: dict[str, int]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def model_settings(model: str, compression: str | None) -> tuple[Compression, dict[str, str]]:
    """The compression and default instructions a model will use, read without loading it."""
    config: dict[str, Any] = {}
    folder = DEFAULT_MODEL_FOLDER if model == DEFAULT_MODEL_NAME else Path(model).expanduser()
    if folder.is_dir():
        config = read_folder_config(folder)
    saved = config.get("compression", "bilinear:2") if config.get("model_type") != "internvl" else "bilinear:2"
    instructions = config.get("instructions") or dict(DEFAULT_INSTRUCTIONS)
    return Compression.parse(compression if compression is not None else saved), instructions


def make_encoder(settings: EvalSettings) -> CachedEncoder:
    compression, instructions = model_settings(settings.model, settings.compression)

    def load() -> Any:
        from transformers.utils import logging as hf_logging

        from magic_mm import MagicEmbedder

        hf_logging.disable_progress_bar()

        return MagicEmbedder.from_pretrained(settings.model, compression=settings.compression, dtype=settings.dtype,
                                             device=settings.device)

    from magic_mm.model.dtypes import dtype_name, resolve_device, resolve_dtype

    dtype = dtype_name(resolve_dtype(settings.dtype, resolve_device(settings.device)))
    cache = (EmbeddingCache.for_model(settings.model, settings.cache_root, dtype) if settings.use_cache
             else EmbeddingCache(None))
    return CachedEncoder(load, cache, compression, instructions, settings.batch_size, settings.show_progress)


def _unique(items: list[Item]) -> tuple[list[Item], list[int]]:
    """Distinct items in first-seen order, and each input's index among them."""
    index: dict[Item, int] = {}
    positions = [index.setdefault(item, len(index)) for item in items]
    return list(index), positions


def evaluate_rows(rows: list[TaskRow], encoder: CachedEncoder, mode: str = "local",
                  ks: tuple[int, ...] = DEFAULT_KS, ties: Ties = "pessimistic",
                  reranker: Any = None) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, int]]:
    """Metrics averaged over queries, per-query predictions, and the item counts."""
    queries, query_pos = _unique([r.query for r in rows])
    pool, pool_pos = _unique([c for r in rows for c in r.candidates])
    q_vecs = encoder.encode(queries, "query")
    c_vecs = encoder.encode(pool, "candidate")
    per_query, predictions, start = [], [], 0
    global_scores = q_vecs @ c_vecs.T if mode == "global" else None
    for n, row in enumerate(rows):
        own = pool_pos[start : start + len(row.candidates)]
        start += len(row.candidates)
        if mode == "global":
            ids = np.arange(len(pool))
            scores = global_scores[query_pos[n]]
            grades = np.zeros(len(pool))
            for j, g in zip(own, row.grades):
                grades[j] = max(grades[j], g)
        else:
            ids = np.asarray(own)
            scores = c_vecs[ids] @ q_vecs[query_pos[n]]
            grades = np.asarray(row.grades, dtype=np.float64)
        if reranker is not None:
            scores = rerank_scores(reranker, row.query, [pool[int(i)] for i in ids], scores, grades, ties)
        per_query.append(query_metrics(scores, grades, ks, NDCG_K, ties))
        order = rank_order(scores, grades, ties)[:TOP_SHOWN]
        predictions.append({
            "row": n, "query": row.query.describe(),
            "top": [{"candidate": pool[int(ids[i])].describe(), "index": int(i),
                     "score": round(float(scores[i]), 5), "grade": float(grades[i])} for i in order],
            "first_relevant_rank": first_relevant_rank(scores, grades, ties),
        })
    counts = {"queries": len(rows), "unique_queries": len(queries), "unique_candidates": len(pool),
              "candidates_per_query": int(np.median([len(r.candidates) for r in rows])) if mode == "local" else len(pool)}
    return mean_metrics(per_query), predictions, counts


RERANK_TOP = 5  # the paper reranks the embedder's top 5


def load_reranker(settings: EvalSettings) -> Any:
    """The model's reranker; a folder without one raises ModelFolderError (a UserError) naming it."""
    from magic_mm.model.reranker import MagicReranker

    return MagicReranker.from_pretrained(settings.model, device=settings.device)


def _as_input(item: Item) -> Any:
    from magic_mm.model.inputs import MMInput

    return MMInput(text=item.text, image=item.image)


def rerank_scores(reranker: Any, query: Item, candidates: list[Item], scores: np.ndarray, grades: np.ndarray,
                  ties: Ties) -> np.ndarray:
    """Scores whose top ``RERANK_TOP`` follow the reranker's order; the rest keep the embedder's.

    ``reranker.rerank(query, candidates, top_k)`` answers hits with ``index`` (into the
    candidates it was given) and ``score``, best first.
    """
    top = rank_order(scores, grades, ties)[:RERANK_TOP]
    hits = reranker.rerank(_as_input(query), [_as_input(candidates[int(i)]) for i in top], top_k=len(top))
    new = np.array(scores, dtype=np.float64)
    ceiling = float(new.max()) + 1.0
    for position, hit in enumerate(hits):
        new[top[int(hit.index)]] = ceiling + len(hits) - position
    return new


def evaluate(specs: list[TaskSpec], settings: EvalSettings, out_dir: Path | None = None) -> dict[str, Any]:
    """Run every task; write per-task JSON, ``summary.json`` and ``results.md`` to ``out_dir``."""
    if settings.ties not in TIES:
        raise UserError(f"--ties {settings.ties!r}: use one of {', '.join(TIES)}")
    known = metric_names(settings.ks)
    for spec in specs:  # fail before any embedding work
        if spec.primary not in known:
            raise UserError(f"task {spec.name}: primary metric {spec.primary!r} unknown; choose one of {', '.join(known)}")
    reranker = load_reranker(settings) if settings.rerank else None
    encoder = make_encoder(settings)
    results = []
    for spec in specs:
        rows = spec.load()
        metrics, predictions, counts = evaluate_rows(rows, encoder, spec.mode, settings.ks, settings.ties, reranker)
        results.append(TaskResult(spec.name, spec.meta, spec.distribution, spec.mode, spec.primary,
                                  metrics[spec.primary], metrics, counts, predictions))
    summary = {
        "model": settings.model,
        "compression": str(encoder.compression),
        "ties": settings.ties,
        "rerank": settings.rerank,
        "embedded_now": encoder.computed,  # 0 when everything came from the cache
        "tasks": {r.name: {k: v for k, v in r.to_dict().items() if k != "predictions"} for r in results},
        "averages": averages(results),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for r in results:
            (out_dir / f"{r.name}.json").write_text(json.dumps(r.to_dict(), indent=1, ensure_ascii=False))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (out_dir / "results.md").write_text(markdown_table(summary))
    return summary


def averages(results: list[TaskResult]) -> dict[str, dict[str, float]]:
    """Mean primary score per meta-task, per distribution (IND/OOD) and overall, as MMEB reports."""
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(r.meta, []).append(r.score)
        if r.distribution:
            groups.setdefault(r.distribution.upper(), []).append(r.score)
        groups.setdefault("overall", []).append(r.score)
    order = [*META_TASKS, "other", "IND", "OOD", "overall"]
    return {name: {"score": float(np.mean(groups[name])), "tasks": len(groups[name])}
            for name in sorted(groups, key=lambda g: order.index(g) if g in order else len(order))}


def markdown_table(summary: dict[str, Any]) -> str:
    """Per-task metrics (in %) and the meta-task averages as Markdown."""
    tasks = summary["tasks"]
    metric_names = [m for m in ("hit@1", "hit@5", "hit@10", "recall@5", "recall@10", "mrr", f"ndcg@{NDCG_K}")
                    if all(m in t["metrics"] for t in tasks.values())]
    lines = [f"model `{summary['model']}` · compression `{summary['compression']}` · ties {summary['ties']}"
             + (" · reranked" if summary["rerank"] else ""), "",
             "| task | meta | mode | queries | cands/query | score | " + " | ".join(metric_names) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(metric_names)]
    for name, t in tasks.items():
        cells = " | ".join(f"{100 * t['metrics'][m]:.1f}" for m in metric_names)
        lines.append(f"| {name} | {t['meta']} | {t['mode']} | {t['counts']['queries']} | "
                     f"{t['counts']['candidates_per_query']} | {100 * t['score']:.1f} ({t['primary']}) | {cells} |")
    lines += ["", "| average | tasks | score |", "|---|---:|---:|"]
    for name, avg in summary["averages"].items():
        lines.append(f"| {name} | {avg['tasks']} | {100 * avg['score']:.1f} |")
    return "\n".join(lines) + "\n"
