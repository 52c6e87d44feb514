"""Choose and save a ``FusionReranker``: it reranks a first-stage list by first-stage score +
weight × the cosine of a second, independently trained dual encoder.

    make fusion-reranker
    .venv/bin/python benchmarks/fusion_reranker.py --embedder magic_mm/default_model \\
        --dual runs/dual-encoder/model --data ../shared/data/flickr8k-1k --out runs/fusion-reranker/model

Only the VAL split is read.  Both models encode its images and captions once; for each weight w,
each caption's embedder top ``--top`` (5, as the paper's reranker) is reordered by
``embedder cosine + w × dual-encoder cosine`` (``FusionReranker.rank``, the arithmetic of its
``rerank``) and text→image R@1 is counted.  The weight with the highest val
R@1 is saved (ties → the smaller weight; weight 0, the embedder alone, is always a candidate, so a
fusion that does not help on val is saved as weight 0).  The test split is never used here: it is
for the default-model table (``make default-model-table``, row 5).

The folder holds ``fusion_reranker.json`` (the weight and the val table it was chosen from) and
the dual encoder's own files; ``magic-mm search --rerank`` uses the copy shipped in
``magic_mm/default_model/fusion_reranker/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from magic_mm.data.captions import read_captioned_images  # noqa: E402
from magic_mm.errors import UserError  # noqa: E402
from magic_mm.model.dual_encoder import DualEncoder  # noqa: E402
from magic_mm.model.fusion_reranker import FusionReranker  # noqa: E402
from magic_mm.progress import progress  # noqa: E402

SPLIT = "val"  # the only split this script reads: the weight is chosen here, never on test
DEFAULT_WEIGHTS = "0.25,0.5,0.75,1,1.5,2"


def parse_weights(text: str) -> list[float]:
    try:
        weights = sorted({float(w) for w in text.split(",") if w.strip()} | {0.0})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights {text!r}: give numbers separated by commas, e.g. 0.25,0.5,1")
    if any(not np.isfinite(w) or w < 0 for w in weights):
        raise argparse.ArgumentTypeError(f"--weights {text!r}: weights must be finite and ≥ 0")
    return weights


def dual_vectors(dual: DualEncoder, inputs: list, role: str, show: bool, label: str, batch: int) -> np.ndarray:
    """The dual encoder's vectors of ``inputs``, with a progress bar."""
    chunks = []
    with progress(len(inputs), show, label) as advance:
        for start in range(0, len(inputs), batch):
            chunks.append(dual.encode(inputs[start : start + batch], role=role, batch_size=batch))
            advance(len(chunks[-1]))
    return np.concatenate(chunks)


def reranked_r1(reranker: FusionReranker, first: np.ndarray, dual: np.ndarray, owner: list[int], top: int) -> float:
    """Text→image R@1 after ``reranker`` reorders each caption's first-stage top ``top`` (as its
    ``rerank`` would, from the cosines computed once per image and caption)."""
    order = np.argsort(-first, axis=1, kind="stable")[:, :top]
    hits = [row[reranker.rank(first[q, row], dual[q, row])[0].index] == owner[q] for q, row in enumerate(order)]
    return float(np.mean(hits))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedder", default=str(REPO / "magic_mm/default_model"),
                        help="the first stage: an embedder folder or name")
    parser.add_argument("--dual", type=Path, default=REPO / "runs/dual-encoder/model",
                        help="a dual-encoder folder saved by benchmarks/dual_encoder.py")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/flickr8k-1k"))
    parser.add_argument("--out", type=Path, default=REPO / "runs/fusion-reranker/model")
    parser.add_argument("--weights", type=parse_weights, default=parse_weights(DEFAULT_WEIGHTS),
                        help=f"candidate weights, comma-separated (default {DEFAULT_WEIGHTS}; 0 is always added)")
    parser.add_argument("--top", type=int, default=5, help="first-stage candidates reranked per caption")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (no progress bars)")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be ≥ 1")
    show = not args.json
    from magic_mm import MagicEmbedder

    start = time.perf_counter()
    try:
        items = read_captioned_images(args.data, SPLIT)
        captions = [c for i in items for c in i.captions]
        owner = [n for n, i in enumerate(items) for _ in i.captions]
        paths = [i.path for i in items]
        dual = DualEncoder.from_pretrained(args.dual)
        embedder = MagicEmbedder.from_pretrained(args.embedder)
        img = embedder.encode(paths, role="candidate", batch_size=16, show_progress=show)
        txt = embedder.encode(captions, role="query", batch_size=32, show_progress=show)
        dual_img = dual_vectors(dual, paths, "candidate", show, f"dual encoder ({len(paths)} images)", 16)
        dual_txt = dual_vectors(dual, captions, "query", show, f"dual encoder ({len(captions)} captions)", 64)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    encode_s = time.perf_counter() - start
    first = (txt @ img.T).astype(np.float64)
    second = (dual_txt @ dual_img.T).astype(np.float64)
    r1 = {w: reranked_r1(FusionReranker(dual, w), first, second, owner, args.top) for w in args.weights}
    best = max(args.weights, key=lambda w: (r1[w], -w))  # the highest val R@1; ties → the smaller weight
    selection = {
        "method": f"the weight with the highest {SPLIT} text→image R@1 after reranking each caption's "
                  f"embedder top {args.top} (ties → the smaller weight; 0 = the embedder alone)",
        "split": SPLIT, "data": args.data, "images": len(items), "captions": len(captions), "top": args.top,
        "first_stage": args.embedder, "dual_encoder": str(args.dual),
        "val_r1_by_weight": {f"{w:g}": r1[w] for w in args.weights},
        "chosen_weight": best, "val_r1": r1[best], "val_r1_embedder_alone": r1[0.0],
        "script": "benchmarks/fusion_reranker.py",
    }
    FusionReranker(dual, best, selection).save_pretrained(args.out)
    if args.json:
        print(json.dumps({"out": str(args.out), "weight": best, "encode_seconds": round(encode_s, 1),
                          "selection": selection}, indent=2, ensure_ascii=False))
        return
    print(f"\n{SPLIT} split: {len(items)} images, {len(captions)} captions; each caption's embedder top "
          f"{args.top} reordered by embedder cosine + w × dual-encoder cosine\n")
    print("| w | val t→i R@1 |\n|---|---|")
    for w in args.weights:
        print(f"| {w:g}{' (embedder alone)' if w == 0 else ''} | {100 * r1[w]:.1f} |")
    print(f"\nchosen: w = {best:g} (val R@1 {100 * r1[best]:.1f}, {100 * (r1[best] - r1[0.0]):+.1f} over the "
          f"embedder alone); encoding took {encode_s:.0f} s; saved to {args.out}")


if __name__ == "__main__":
    main()
