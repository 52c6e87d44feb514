"""The default model's README table: recall@1/5/10 (text→image, image→text) on a split of
flickr8k-1k, visual tokens per image, median encode time per image (one per call) and images per
second in batches of 16, for each row.

    .venv/bin/python benchmarks/default_model.py --row "untrained=base:bilinear:2" \\
        --row "stage 2, in-batch=runs/default-model/stage2-s2/inbatch" --out results/default_model.json

A row is ``LABEL=MODEL[@COMPRESSION]`` where MODEL is a saved folder, ``magic-mm-tiny``, or
``base`` (the untrained default parts).  ``LABEL=rerank:EMBEDDER+RERANKER`` reranks the
embedder's top 5 (text→image) with a reranker folder: a FusionReranker (``fusion_reranker.json``:
the embedder's score + weight × a dual encoder's cosine) or a MagicReranker (``reranker.json``).
``LABEL=dual:FOLDER`` evaluates the dual-encoder baseline saved by ``benchmarks/dual_encoder.py``
(the model class is ``magic_mm.model.dual_encoder.DualEncoder``): its encode time per image includes
EfficientNet-Lite0 and the head, like the other rows; it feeds no LM, so its visual tokens per
image are reported as 0 (the image becomes one pooled 1280-d vector), marked "no LM" in the table
and ``visual_tokens_note`` in the JSON.  All rows are measured in one run, one after another, so
their timings are comparable.

The labels column is label-prompt classification accuracy (hit@1 among the label texts) on
``--labels`` (default ``tasks-classification.yaml``: test photos whose captions agree on one of
four labels), through the same harness as ``magic-mm eval``.  After the table, each row is
compared with the row before it (and any ``--compare A:B`` pair, 1-based) on the same queries:
the difference in R@1 / R@5 with a paired bootstrap 95 % confidence interval.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from magic_mm.data.captions import read_captioned_images  # noqa: E402
from magic_mm.eval.significance import paired_bootstrap_ci  # noqa: E402

KS = (1, 5, 10)


def first_ranks(scores: np.ndarray, relevant: list[set[int]]) -> np.ndarray:
    """Each query's 0-based rank of its best-placed relevant item."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.array([next(r for r, c in enumerate(row) if c in rel) for row, rel in zip(order, relevant)])


def recalls(first: np.ndarray) -> dict[str, float]:
    """recall@k as the share of queries with any relevant item in their top k (the usual
    cross-modal retrieval definition; with one relevant image it is hit@k)."""
    return {f"R@{k}": float(np.mean(first < k)) for k in KS}


def load_embedder(model: str):  # noqa: ANN201
    from magic_mm import MagicEmbedder
    from magic_mm.model.config import EmbedderConfig

    model, _, compression = model.partition("@")
    if model == "base":
        spec = json.loads((REPO / "magic_mm/default_model/config.json").read_text())
        config = EmbedderConfig.from_dict({**spec, "lora": None}, "base")
        return MagicEmbedder.from_config(config, compression or None).eval()
    return MagicEmbedder.from_pretrained(model, compression=compression or None)


def encode_timed(embedder, paths: list[Path]) -> tuple[np.ndarray, list[float]]:  # noqa: ANN001
    """One image per call, so every image gets its own encode time."""
    vectors, times = [], []
    for path in paths:
        start = time.perf_counter()
        vectors.append(embedder.encode([path], role="candidate")[0])
        times.append(time.perf_counter() - start)
    return np.stack(vectors), times


def batched_rate(embedder, paths: list[Path], batch: int = 16) -> float:  # noqa: ANN001
    """Images per second encoding ``paths`` in batches of ``batch``, as ``magic-mm index`` does
    (decoding included). Timed only: the recall columns use the one-per-call vectors."""
    start = time.perf_counter()
    embedder.encode(paths, role="candidate", batch_size=batch)
    return len(paths) / (time.perf_counter() - start)


class ItemsToDual:
    """The harness's encoder interface over the dual encoder, which picks its head by modality
    (images → image head, texts → text head) rather than by role."""

    def __init__(self, dual) -> None:  # noqa: ANN001
        self.dual = dual

    def encode(self, inputs, instruction: str = "", role: str = "query", batch_size: int = 32) -> np.ndarray:  # noqa: ANN001, ARG002
        images = [i.image is not None for i in inputs]
        if all(images):
            return self.dual.encode([i.image for i in inputs], role="candidate", batch_size=batch_size)
        if not any(images):
            return self.dual.encode([i.text for i in inputs], role="query", batch_size=batch_size)
        raise ValueError("the dual encoder embeds images or texts, not both in one item")


def label_accuracy(embedder, tasks: Path) -> float:  # noqa: ANN001
    """hit@1 of label-prompt classification, through the same harness as `magic-mm eval`."""
    from magic_mm.eval.cache import CachedEncoder, EmbeddingCache
    from magic_mm.eval.harness import evaluate_rows
    from magic_mm.eval.tasks import load_tasks
    from magic_mm.model.compression import Compression
    from magic_mm.model.prompts import DEFAULT_INSTRUCTIONS

    spec = load_tasks(tasks)[0]
    encoder = CachedEncoder(lambda: embedder, EmbeddingCache(None), Compression.parse("none"),
                            dict(DEFAULT_INSTRUCTIONS), batch_size=16)
    metrics, _, _ = evaluate_rows(spec.load(), encoder, spec.mode)
    return metrics[spec.primary]


def reranked_top5(folder: str, scores: np.ndarray, top: np.ndarray, paths: list[Path],
                  captions: list[str]) -> Iterator[list]:
    """Each caption's reranked ``top`` row (hits index into it), with either kind of reranker folder:
    a FusionReranker (``fusion_reranker.json``) gets the embedder's scores of the top 5 as its
    first-stage scores; a MagicReranker (``reranker.json``) reads each (caption, photo) pair."""
    from magic_mm.index.search import load_reranker
    from magic_mm.model.fusion_reranker import FusionReranker

    reranker = load_reranker(folder)  # the one place that tells the two kinds of folder apart
    if isinstance(reranker, FusionReranker):
        # The dual encoder embeds each test image and caption once, not once per (query, candidate) pair;
        # ``rank`` fuses those cosines with the first-stage scores exactly as ``rerank`` does.
        images = reranker.dual.encode(paths, role="candidate", batch_size=16)
        texts = reranker.dual.encode(captions, role="query", batch_size=64)
        for q, row in enumerate(top):
            yield reranker.rank(scores[q, row], images[row] @ texts[q])
        return
    from magic_mm.train.features import VisionCache

    # The frozen vision encoder runs once per test image, not once per (query, candidate) pair.
    grids = VisionCache().build(reranker.model.backbone, paths)
    for q, row in enumerate(top):
        yield reranker.rerank(captions[q], [grids.item(paths[c]) for c in row], top_k=5)


def evaluate_row(label: str, spec: str, items, captions, owner, labels: Path | None) -> dict:  # noqa: ANN001
    paths = [i.path for i in items]
    rerank = None
    if spec.startswith("rerank:"):
        spec, _, rerank = spec[len("rerank:"):].partition("+")
    dual = spec.startswith("dual:")
    if dual:
        from magic_mm.model.dual_encoder import DualEncoder

        embedder = DualEncoder.from_pretrained(spec[len("dual:"):])
    else:
        embedder = load_embedder(spec)
    img, times = encode_timed(embedder, paths)
    rate = batched_rate(embedder, paths)
    txt = embedder.encode(captions, role="query", batch_size=32)
    tokens = 0 if dual else embedder.backbone.visual_tokens(448, 448)
    scores = txt @ img.T
    t2i_first = first_ranks(scores, [{o} for o in owner])
    if rerank:
        reranked = scores.copy()
        top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        for q, hits in enumerate(reranked_top5(rerank, scores, top, paths, captions)):
            for place, hit in enumerate(hits):  # reranked top 5 above everything else, in the new order
                reranked[q, top[q, hit.index]] = 1e3 - place
        t2i_first = first_ranks(reranked, [{o} for o in owner])
    by_image: list[set[int]] = [set() for _ in items]
    for q, o in enumerate(owner):
        by_image[o].add(q)
    i2t_first = first_ranks(scores.T, by_image)
    # the reranker rescores text→image lists only: its row classifies like its embedder's row
    accuracy = None if rerank or labels is None else label_accuracy(ItemsToDual(embedder) if dual else embedder, labels)
    row = {"row": label, "model": spec, "visual_tokens": tokens,
           "median_encode_ms": 1000 * statistics.median(times), "images_per_s_batch16": rate,
           "text_to_image": recalls(t2i_first), "image_to_text": recalls(i2t_first), "label_accuracy": accuracy,
           "reranked_top5": bool(rerank),
           # per-query 0-based rank of the first relevant item, for paired comparisons between rows
           "text_to_image_first_rank": t2i_first.tolist(), "image_to_text_first_rank": i2t_first.tolist()}
    if dual:
        row["visual_tokens_note"] = "no LM"  # one pooled vector per image, projected by a linear head
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| row | visual tokens / image | median encode ms / image | images/s, batch 16 | t→i R@1 | R@5 | R@10 "
            "| i→t R@1 | R@5 | R@10 | labels acc |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        t, i = r["text_to_image"], r["image_to_text"]
        tokens = f"{r['visual_tokens']} ({r['visual_tokens_note']})" if "visual_tokens_note" in r else r["visual_tokens"]
        accuracy = "—" if r.get("label_accuracy") is None else f"{100 * r['label_accuracy']:.1f}"
        lines.append(f"| {r['row']} | {tokens} | {r['median_encode_ms']:.0f} | {r['images_per_s_batch16']:.1f} | "
                     + " | ".join(f"{100 * d[f'R@{k}']:.1f}" for d in (t, i) for k in KS) + f" | {accuracy} |")
    return "\n".join(lines)


def row_number(rows: list[dict], position: int) -> str:
    """The number a row's label starts with ("7. dual encoder" → "7"), else its 1-based position."""
    first = rows[position]["row"].split(" ", 1)[0].rstrip(".")
    return first if first[:1].isdigit() else str(position + 1)


def compare(a: dict, b: dict, resamples: int) -> dict:
    """Row b minus row a on the same queries: R@1 / R@5 differences with paired bootstrap 95 % CIs."""
    out = {}
    for direction in ("text_to_image", "image_to_text"):
        first_a = np.array(a[f"{direction}_first_rank"])
        first_b = np.array(b[f"{direction}_first_rank"])
        for k in (1, 5):
            mean, low, high = paired_bootstrap_ci(first_a < k, first_b < k, resamples)
            out[f"{direction} R@{k}"] = {"difference": mean, "ci95": [low, high]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/flickr8k-1k"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--row", action="append", required=True, help="LABEL=MODEL[@COMPRESSION]")
    parser.add_argument("--labels", default=str(REPO / "tasks-classification.yaml"),
                        help="label-prompt classification tasks file for the labels column ('' for none)")
    parser.add_argument("--compare", action="append", default=[], metavar="A:B",
                        help="also compare row B with row A (1-based), beyond each row with the one before")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples per comparison")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    labels = Path(args.labels) if args.labels else None  # Path("") would be the current folder
    pairs = [(n - 1, n) for n in range(1, len(args.row))]
    for pair in args.compare:
        a, _, b = pair.partition(":")
        if not (a.isdigit() and b.isdigit() and 1 <= int(a) <= len(args.row) and 1 <= int(b) <= len(args.row)):
            parser.error(f"--compare {pair!r}: give two row numbers A:B between 1 and {len(args.row)}")
        pairs.append((int(a) - 1, int(b) - 1))
    items = read_captioned_images(args.data, args.split)
    captions = [c for i in items for c in i.captions]
    owner = [n for n, i in enumerate(items) for _ in i.captions]
    rows = []
    for row in args.row:
        label, _, spec = row.rpartition("=")
        rows.append(evaluate_row(label, spec, items, captions, owner, labels))
        summary = {k: v for k, v in rows[-1].items() if not k.endswith("_first_rank")}
        print(json.dumps(summary), flush=True)
    print(f"\n{args.split} split: {len(items)} images, {len(captions)} captions\n")
    print(markdown(rows))
    print("\ndifferences on the same queries, points, with paired bootstrap 95 % CIs:")
    comparisons = []
    for a, b in pairs:
        diffs = compare(rows[a], rows[b], args.resamples)
        comparisons.append({"from": rows[a]["row"], "to": rows[b]["row"], **diffs})
        print(f"  row {row_number(rows, b)} − row {row_number(rows, a)}: " + ", ".join(
            f"{name} {100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
            for name, d in diffs.items() if name != "image_to_text R@1"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"split": args.split, "rows": rows, "comparisons": comparisons}, indent=2))


if __name__ == "__main__":
    main()
