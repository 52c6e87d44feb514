"""What happens when an index built in one dtype is searched in the other (issue 10).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dtype_mixing.py [--tasks benchmarks/flickr8k-t2i.yaml]

Embeds the task's queries and candidates with ``magic-mm-tiny`` in float32 and in
bfloat16 (through the eval harness and its per-dtype embedding cache, so a second run
costs nothing), then prints

* the cosine between each item's float32 and bfloat16 vector (queries and candidates);
* the task's primary metric and recall@k for all four (query dtype, candidate dtype)
  pairs: float32/float32 is an index built and searched in float32, bfloat16/float32 an
  index built in float32 and searched in bfloat16, and so on.

This is the measurement behind the index rule: a dtype mismatch is allowed, with a note
(``ModelStamp.dtype_note``), because the mixed pairs score like the matched ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from magic_mm.eval.harness import EvalSettings, evaluate_rows, make_encoder
from magic_mm.eval.tasks import load_tasks

DTYPES = ("float32", "bfloat16")


class Mixed:
    """Queries from one encoder, candidates from another."""

    def __init__(self, queries: object, candidates: object) -> None:
        self.queries, self.candidates = queries, candidates

    def encode(self, items: list, role: str) -> np.ndarray:
        return (self.queries if role == "query" else self.candidates).encode(items, role)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=Path, default=Path(__file__).parent / "flickr8k-t2i.yaml")
    parser.add_argument("--model", default="magic-mm-tiny")
    parser.add_argument("--cache-dir", type=Path, default=None, help="embedding cache root (default: user cache)")
    args = parser.parse_args()
    encoders = {d: make_encoder(EvalSettings(model=args.model, dtype=d, cache_root=args.cache_dir, show_progress=True))
                for d in DTYPES}
    for spec in load_tasks(args.tasks):
        rows = spec.load()
        queries = list(dict.fromkeys(r.query for r in rows))
        pool = list(dict.fromkeys(c for r in rows for c in r.candidates))
        print(f"\n{spec.name}: {len(queries)} queries, {len(pool)} candidates")
        for role, items in (("query", queries), ("candidate", pool)):
            a, b = (encoders[d].encode(items, role) for d in DTYPES)
            cos = (a * b).sum(1)
            print(f"  {role:9} vectors, float32 vs bfloat16: cosine mean {cos.mean():.5f}, min {cos.min():.5f}")
        print(f"  {'queries':9} {'candidates (index)':18} " + " ".join(f"{k:>9}" for k in ("primary", "R@1", "R@5",
                                                                                           "R@10")))
        for q in DTYPES:
            for c in DTYPES:
                metrics, _, _ = evaluate_rows(rows, Mixed(encoders[q], encoders[c]), spec.mode)
                cells = [metrics.get(spec.primary, float("nan"))] + [metrics.get(f"recall@{k}", float("nan"))
                                                                     for k in (1, 5, 10)]
                print(f"  {q:9} {c:18} " + " ".join(f"{100 * v:9.1f}" for v in cells))


if __name__ == "__main__":
    main()
