"""How well a stage-3 judge separates a caption's own photo from its hardest wrong photos.

For each caption of a split, two pairs: the caption with its own photo (relevant) and the
caption with one of its top-20 wrong photos as the embedder ranks them (not relevant;
picked with a fixed seed).  That is the pool stage 3 judges.  The cut of each judge is
chosen on train pairs built the same way, then applied to val (or --split).

    .venv/bin/python benchmarks/judge_accuracy.py            # magic-mm-tiny retrieves, MiniLM judges
    .venv/bin/python benchmarks/judge_accuracy.py --json

Judges compared in one run:

- ``captions (MiniLM)``: ``ReferenceCaptionJudge``, the best cosine between the caption and
  the photo's other human captions (the query itself left out);
- ``embedder cosine``: the retrieving embedder's own query–candidate similarity, as a floor
  (a judge no better than the retriever adds nothing in stage 3);
- ``always yes``: the paper's rule applied to a judge that says "yes" to everything.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from magic_mm.data.captions import read_captioned_images  # noqa: E402
from magic_mm.train.judge import Verdict, calibrated_threshold  # noqa: E402
from magic_mm.train.reference_judge import ReferenceCaptionJudge  # noqa: E402

QUESTION = "{query}"


def hard_pairs(embedder, folder: str, split: str, top: int, seed: int, limit: int | None = None):  # noqa: ANN001, ANN201
    """[(caption, photo path, relevant, embedder cosine)] : own photo + one of the top wrong ones per caption.

    ``limit`` keeps the split's first N photos (their captions' wrong photos come from those N too)."""
    items = read_captioned_images(folder, split)[:limit]
    paths = [i.path for i in items]
    captions = [c for i in items for c in i.captions]
    owner = [n for n, i in enumerate(items) for _ in i.captions]
    img = embedder.encode(paths, role="candidate", batch_size=16)
    txt = embedder.encode(captions, role="query", batch_size=32)
    scores = txt @ img.T
    rng = random.Random(seed)
    pairs = []
    for q, (caption, own) in enumerate(zip(captions, owner)):
        wrong = [int(c) for c in np.argsort(-scores[q], kind="stable") if c != own][:top]
        pick = rng.choice(wrong)
        pairs.append((caption, paths[own], True, float(scores[q, own])))
        pairs.append((caption, paths[pick], False, float(scores[q, pick])))
    return pairs


def accuracy(margins: list[float], relevant: list[bool], cut: float) -> float:
    return float(np.mean([(m > cut) == r for m, r in zip(margins, relevant)]))


def judge_row(name: str, train: tuple[list[float], list[bool]], test: tuple[list[float], list[bool]],
              fixed_cut: float | None = None) -> dict:
    """The cut that best separates the train pairs, and the test accuracy at that cut."""
    def verdicts(margins, relevant, want):  # noqa: ANN001, ANN202
        return [Verdict(m, 0.0) for m, r in zip(margins, relevant) if r == want]

    cut, train_acc = calibrated_threshold(verdicts(*train, True), verdicts(*train, False))
    row = {"judge": name, "cut": cut, "train_accuracy": train_acc, "accuracy": accuracy(*test, cut),
           "says_yes_to_relevant": accuracy([m for m, r in zip(*test) if r], [True] * sum(test[1]), cut),
           "says_no_to_wrong": accuracy([m for m, r in zip(*test) if not r], [False] * (len(test[1]) - sum(test[1])), cut)}
    if fixed_cut is not None:
        row["accuracy_at_shipped_cut"] = accuracy(*test, fixed_cut)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/flickr8k-1k"))
    parser.add_argument("--model", default="magic-mm-tiny", help="the embedder that retrieves the wrong photos")
    parser.add_argument("--split", default="val")
    parser.add_argument("--calibrate-split", default="train")
    parser.add_argument("--calibrate-photos", type=int, default=200,
                        help="first N photos of the calibration split (the cut needs few pairs)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from magic_mm import MagicEmbedder

    embedder = MagicEmbedder.from_pretrained(args.model)
    judge = ReferenceCaptionJudge(args.data, QUESTION)
    splits = {}
    for split, limit in ((args.calibrate_split, args.calibrate_photos), (args.split, None)):
        pairs = hard_pairs(embedder, args.data, split, args.top, args.seed, limit)
        print(f"{split}: {len(pairs)} pairs", file=sys.stderr, flush=True)
        relevant = [p[2] for p in pairs]
        splits[split] = {
            "captions (MiniLM)": ([judge.logits(p[0], p[1])[0] for p in pairs], relevant),
            "embedder cosine": ([p[3] for p in pairs], relevant),
            "always yes": ([1.0] * len(pairs), relevant),
        }
    rows = []
    for name in splits[args.split]:
        fixed = judge.cut if name.startswith("captions") else None
        rows.append(judge_row(name, splits[args.calibrate_split][name], splits[args.split][name], fixed))
    result = {"data": args.data, "split": args.split, "calibrated_on": f"{args.calibrate_split}[:{args.calibrate_photos}]", "retriever": args.model,
              "pairs": len(splits[args.split]["always yes"][1]), "top": args.top, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['pairs']} {args.split} pairs (each caption: its own photo + one of its top-{args.top} wrong "
          f"photos by {args.model}); cuts chosen on the first {args.calibrate_photos} {args.calibrate_split} photos")
    print(f"{'judge':<20} {'cut':>7} {'train acc':>9} {'acc':>7} {'yes|own':>8} {'no|wrong':>9}")
    for r in rows:
        print(f"{r['judge']:<20} {r['cut']:>7.3f} {r['train_accuracy']:>9.1%} {r['accuracy']:>7.1%} "
              f"{r['says_yes_to_relevant']:>8.1%} {r['says_no_to_wrong']:>9.1%}")
    captions = rows[0]
    print(f"captions judge at its shipped cut {judge.cut}: {captions['accuracy_at_shipped_cut']:.1%}")


if __name__ == "__main__":
    main()
