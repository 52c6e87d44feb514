"""How many of stage 2's mined hard negatives are in fact matches?  For a caption → photo
sub-dataset of a stage-2 run, the captions judge (the photo's other human captions through
MiniLM, 93.0 % accurate on val pairs) reads each query against each mined negative photo, and,
for comparison, against the same number of photos drawn at random from the pool.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mined_false_negatives.py \\
        --run runs/default-model/stage2-s2 --dataset flickr8k-t2i

A high share of "relevant" among the mined negatives means the hard-negative phase trains
the model away from true matches: the false negatives stage 3's judge is there to remove.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from magic_mm.train.config import load_config
from magic_mm.train.mixture import TrainData
from magic_mm.train.judge import decide
from magic_mm.train.reference_judge import ReferenceCaptionJudge
from magic_mm.train.stage2 import NEGATIVES_FILE, negatives_from_json

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "runs/default-model/stage2-s2")
    parser.add_argument("--dataset", default="flickr8k-t2i", help="a caption → photo sub-dataset of the run")
    parser.add_argument("--references", default=str(REPO.parent / "shared/data/flickr8k-1k"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = load_config(args.run / "config.yaml")
    data = TrainData.from_config(config)
    if args.dataset not in data.names:
        parser.error(f"--dataset {args.dataset!r}: the run's sub-datasets are {', '.join(data.names)}")
    mined = negatives_from_json(json.loads((args.run / NEGATIVES_FILE).read_text()))[args.dataset]
    rows = {row.index: row for row in data.readers[data.names.index(args.dataset)]}
    pool = sorted({row.positive.image for row in rows.values()})
    judge = ReferenceCaptionJudge(args.references, "{query}")  # the question is the caption itself
    rng = np.random.default_rng(args.seed)
    verdicts: dict[str, list[bool]] = {"mined": [], "random": []}
    for index, negatives in mined.items():
        row = rows[index]
        others = [p for p in pool if p != row.positive.image]
        randoms = [others[i] for i in rng.choice(len(others), size=len(negatives), replace=False)]
        for kind, photos in (("mined", [n.image for n in negatives]), ("random", randoms)):
            verdicts[kind] += [decide(*judge.logits(row.query.text, photo)) for photo in photos]  # stage 3's rule
    window = config.hard_negatives.window
    print(f"{args.run} / {args.dataset}: {len(mined)} queries, {len(verdicts['mined'])} mined negatives "
          f"(ranks {window[0]}-{window[1]} of {len(pool)} photos)")
    for kind, v in verdicts.items():
        print(f"  {kind:6s} negatives judged relevant by the captions judge: {100 * np.mean(v):.1f}% ({sum(v)} of {len(v)})")


if __name__ == "__main__":
    main()
