"""Can the stage-1 (captioning) model reorder the embedder's top 5 better than the embedder?

For text→image queries of a flickr8k-1k split, each of the embedder's top-5 photos is scored by
log P(query caption | photo) under a stage-1 model, with the caption prompt stage 1 trained on.
No training: it asks whether the backbone can tell the photos apart at all, which a trained
reranker (``magic-mm train reranker``) would have to learn on top of.  It prints R@1 of the
embedder alone, of the likelihood order, and of cosine + weight × log-likelihood for a few
weights.  The weights are swept on the same queries, so the best of them is an upper bound.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/caption_likelihood_rerank.py \\
        --generator runs/default-model/stage1-s2/model --queries 400
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from magic_mm import MagicEmbedder  # noqa: E402
from magic_mm.data.captions import read_captioned_images  # noqa: E402
from magic_mm.model.generative import GenExample, answer_log_likelihoods, build_batch  # noqa: E402
from magic_mm.progress import progress  # noqa: E402
from magic_mm.train.features import VisionCache  # noqa: E402

TOP = 5
WEIGHTS = (0.002, 0.005, 0.01, 0.02, 0.05)


def caption_log_likelihoods(generator: MagicEmbedder, photos: list, caption: str, prompt: str) -> np.ndarray:
    """log P(caption | photo) for each (cached) photo, summed over the caption's tokens."""
    batch = build_batch(generator, [GenExample([photo, "\n", prompt + "\n"], caption) for photo in photos])
    with torch.inference_mode():
        return answer_log_likelihoods(generator, batch).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedder", default="magic-mm-tiny")
    parser.add_argument("--generator", default=str(REPO / "runs/default-model/stage1-s2/model"),
                        help="a stage-1 model folder")
    parser.add_argument("--prompt", default="Describe the image in one sentence.", help="stage 1's caption prompt")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/flickr8k-1k"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--queries", type=int, default=400, help="a seeded sample of the split's captions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (Path(args.generator) / "config.json").is_file():
        parser.error(f"--generator {args.generator}: not a model folder; run `make default-model` (stage 1) first")
    items = read_captioned_images(args.data, args.split)
    paths = [i.path for i in items]
    captions = [c for item in items for c in item.captions]
    owner = np.array([n for n, item in enumerate(items) for _ in item.captions])
    embedder = MagicEmbedder.from_pretrained(args.embedder)
    cosine = embedder.encode(captions, role="query") @ embedder.encode(paths, role="candidate").T
    top = np.argsort(-cosine, axis=1, kind="stable")[:, :TOP]
    generator = MagicEmbedder.from_pretrained(args.generator)
    grids = VisionCache().build(generator.backbone, paths)
    rng = np.random.default_rng(args.seed)
    queries = np.sort(rng.choice(len(captions), size=min(args.queries, len(captions)), replace=False))
    scored = []
    with progress(len(queries), True, "scoring top 5s") as advance:
        for q in queries:
            photos = [grids.item(paths[c]).image for c in top[q]]
            scored.append(caption_log_likelihoods(generator, photos, captions[q], args.prompt))
            advance(1)
    likelihood = np.stack(scored)
    own, head = owner[queries], top[queries]
    head_cosine = np.take_along_axis(cosine[queries], head, axis=1)

    def r_at_1(score: np.ndarray) -> float:
        return 100 * float(np.mean(head[np.arange(len(head)), np.argmax(score, axis=1)] == own))

    r5 = 100 * float(np.mean((head == own[:, None]).any(axis=1)))
    print(f"{len(queries)} {args.split} queries of {args.data}; the top {TOP} of {args.embedder}, "
          f"log-likelihood under {args.generator}")
    print(f"  embedder order             R@1 {r_at_1(head_cosine):5.1f}   (R@5 {r5:.1f}; "
          f"a random order of the top {TOP}: {r5 / TOP:.1f})")
    print(f"  caption log-likelihood     R@1 {r_at_1(likelihood):5.1f}")
    for weight in WEIGHTS:
        print(f"  cosine + {weight:<5} × log-lik R@1 {r_at_1(head_cosine + weight * likelihood):5.1f}")


if __name__ == "__main__":
    main()
