"""Is the bf16 default's recall change real or noise?  flickr8k-1k test text→image R@k of
magic-mm-tiny in float32 and in another dtype (default: bfloat16), with a paired bootstrap
95 % confidence interval of the difference and an exact sign test on the queries that changed.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dtype_recall_ci.py [--cache-dir DIR] [--k 5]

Both dtypes rank the same 1,080 queries, so the comparison is paired: only queries whose
hit@k differs between the two runs carry information.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from magic_mm.eval.harness import EvalSettings, evaluate_rows, make_encoder
from magic_mm.eval.significance import paired_bootstrap_ci, sign_test
from magic_mm.eval.tasks import load_tasks


def hits(spec, rows, model: str, dtype: str, cache: Path | None, k: int) -> np.ndarray:  # noqa: ANN001
    encoder = make_encoder(EvalSettings(model=model, dtype=dtype, cache_root=cache, show_progress=True))
    _, predictions, _ = evaluate_rows(rows, encoder, spec.mode)
    return np.array([p["first_relevant_rank"] is not None and p["first_relevant_rank"] <= k for p in predictions])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=Path, default=Path(__file__).parent / "flickr8k-t2i.yaml")
    parser.add_argument("--model", default="magic-mm-tiny")
    parser.add_argument("--dtype", default="bfloat16", help="compared with float32")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    spec = load_tasks(args.tasks)[0]
    rows = spec.load()
    base = hits(spec, rows, args.model, "float32", args.cache_dir, args.k)
    other = hits(spec, rows, args.model, args.dtype, args.cache_dir, args.k)
    diff = other.astype(float) - base.astype(float)
    mean, low, high = paired_bootstrap_ci(base, other, args.resamples)
    gained, lost = int((diff > 0).sum()), int((diff < 0).sum())
    print(f"{len(diff)} queries, R@{args.k}: float32 {100 * base.mean():.2f}, {args.dtype} {100 * other.mean():.2f}, "
          f"difference {100 * mean:+.2f} points")
    print(f"paired bootstrap 95% CI of the difference ({args.resamples} resamples): "
          f"[{100 * low:+.2f}, {100 * high:+.2f}] points")
    print(f"queries changed: {gained} gained, {lost} lost; exact sign test p = {sign_test(gained, lost):.3f}")


if __name__ == "__main__":
    main()
