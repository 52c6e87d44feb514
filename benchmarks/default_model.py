"""The default model's README table: recall@1/5/10 (text→image, image→text) on a split of
flickr8k-1k, visual tokens per image and median encode time per image, for each row.

    .venv/bin/python benchmarks/default_model.py --row "untrained=base:bilinear:2" \\
        --row "stage 2, in-batch=runs/default-model/stage2-s2/inbatch" --out results/default_model.json

A row is ``LABEL=MODEL[@COMPRESSION]`` where MODEL is a saved folder, ``magic-mm-tiny``, or
``base`` (the untrained default parts).  ``LABEL=rerank:EMBEDDER+RERANKER`` reranks the
embedder's top 5 (text→image) with a MagicReranker folder.  ``LABEL=dual:FOLDER`` evaluates the
dual-encoder baseline saved by ``benchmarks/dual_encoder.py``: its encode time per image includes
EfficientNet-Lite0 and the head, like the other rows; it feeds no LM, so its visual tokens per
image are reported as 0 (the image becomes one pooled 1280-d vector), marked "no LM" in the table
and ``visual_tokens_note`` in the JSON.  All rows are measured in one run, one after another, so
their timings are comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from magic_mm.data.captions import read_captioned_images  # noqa: E402


def recalls(scores: np.ndarray, relevant: list[set[int]], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """recall@k as the share of queries with any relevant item in their top k (the usual
    cross-modal retrieval definition; with one relevant image it is hit@k)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    first = np.array([next(r for r, c in enumerate(row) if c in rel) for row, rel in zip(order, relevant)])
    return {f"R@{k}": float(np.mean(first < k)) for k in ks}


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


def evaluate_row(label: str, spec: str, items, captions, owner) -> dict:  # noqa: ANN001
    paths = [i.path for i in items]
    rerank = None
    if spec.startswith("rerank:"):
        spec, _, rerank = spec[len("rerank:"):].partition("+")
    dual = spec.startswith("dual:")
    if dual:
        from dual_encoder import DualEncoder

        embedder = DualEncoder.from_pretrained(spec[len("dual:"):])
    else:
        embedder = load_embedder(spec)
    img, times = encode_timed(embedder, paths)
    txt = embedder.encode(captions, role="query", batch_size=32)
    tokens = 0 if dual else embedder.backbone.visual_tokens(448, 448)
    scores = txt @ img.T
    t2i = recalls(scores, [{o} for o in owner])
    if rerank:
        from magic_mm import MagicReranker

        from magic_mm.train.features import VisionCache

        reranker = MagicReranker.from_pretrained(rerank)
        # The frozen vision encoder runs once per test image, not once per (query, candidate) pair.
        grids = VisionCache().build(reranker.model.backbone, paths)
        reranked = scores.copy()
        top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        for q, row in enumerate(top):
            hits = reranker.rerank(captions[q], [grids.item(paths[c]) for c in row], top_k=5)
            for place, hit in enumerate(hits):  # reranked top 5 above everything else, in the new order
                reranked[q, row[hit.index]] = 1e3 - place
        t2i = recalls(reranked, [{o} for o in owner])
    by_image: list[set[int]] = [set() for _ in items]
    for q, o in enumerate(owner):
        by_image[o].add(q)
    i2t = recalls(scores.T, by_image)
    row = {"row": label, "model": spec, "visual_tokens": tokens,
           "median_encode_ms": 1000 * statistics.median(times),
           "text_to_image": t2i, "image_to_text": i2t, "reranked_top5": bool(rerank)}
    if dual:
        row["visual_tokens_note"] = "no LM"  # one pooled vector per image, projected by a linear head
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| row | visual tokens / image | median encode ms / image | t→i R@1 | R@5 | R@10 "
            "| i→t R@1 | R@5 | R@10 |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        t, i = r["text_to_image"], r["image_to_text"]
        tokens = f"{r['visual_tokens']} ({r['visual_tokens_note']})" if "visual_tokens_note" in r else r["visual_tokens"]
        lines.append(f"| {r['row']} | {tokens} | {r['median_encode_ms']:.0f} | "
                     + " | ".join(f"{100 * d[k]:.1f}" for d in (t, i) for k in ("R@1", "R@5", "R@10")) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/flickr8k-1k"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--row", action="append", required=True, help="LABEL=MODEL[@COMPRESSION]")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    items = read_captioned_images(args.data, args.split)
    captions = [c for i in items for c in i.captions]
    owner = [n for n, i in enumerate(items) for _ in i.captions]
    rows = []
    for row in args.row:
        label, _, spec = row.rpartition("=")
        rows.append(evaluate_row(label, spec, items, captions, owner))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.split} split: {len(items)} images, {len(captions)} captions\n")
    print(markdown(rows))
    base = rows[0]["text_to_image"]["R@5"]
    for r in rows[1:]:
        print(f"{r['row']}: text→image R@5 {r['text_to_image']['R@5'] / base:.2f}× row 1" if base else "")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"split": args.split, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
