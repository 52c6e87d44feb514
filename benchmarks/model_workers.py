"""What the model workers buy ``encode`` on a CPU, interleaved in one run.

Encodes the same photos (as candidates, from their files, batch 16, as ``magic-mm index`` does)
with ``workers=1`` (every batch on the calling thread, on all intra-op threads) and with 2 or
more workers (successive batches side by side, each worker on its share of the threads;
``magic_mm.model.workers``), alternating which goes first each round. Prints the median
ms per photo, the ratio, and the largest difference between the two runs' vectors.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_workers.py [--photos 96] [--rounds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from magic_mm import MagicEmbedder

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k-1k" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="magic-mm-tiny")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--photos", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, choices=range(1, 101), metavar="1..100")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    model = MagicEmbedder.from_pretrained(args.model, dtype=args.dtype)
    paths = sorted(args.data.glob("*.jpg"))[: args.photos]
    if len(paths) <= args.batch:
        parser.error(f"--photos {args.photos}: needs more photos than one batch of {args.batch} in {args.data}")
    variants = {"1 (every batch here)": 1, f"{args.workers} side by side": args.workers}
    ms: dict[str, list[float]] = {name: [] for name in variants}
    vectors: dict[str, np.ndarray] = {}
    for name, workers in variants.items():  # warm-up: oneDNN kernels, first-call allocations
        model.encode(paths[: 2 * args.batch], role="candidate", batch_size=args.batch, workers=workers)
    names = list(variants)
    for round_ in range(args.rounds):
        for name in names[round_ % 2:] + names[: round_ % 2]:
            start = time.perf_counter()
            vectors[name] = model.encode(paths, role="candidate", batch_size=args.batch, workers=variants[name])
            ms[name].append((time.perf_counter() - start) * 1000 / len(paths))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"{args.model}, {dtype}, {torch.get_num_threads()} intra-op threads, {len(paths)} photos in batches of "
          f"{args.batch}, {args.rounds} interleaved rounds (medians)")
    print("| workers | ms per photo | speed-up | rounds |")
    print("|---|---:|---:|---|")
    base = statistics.median(ms[names[0]])
    for name in variants:
        median = statistics.median(ms[name])
        print(f"| {name} | {median:.1f} | {base / median:.2f}× | {', '.join(f'{v:.1f}' for v in ms[name])} |")
    a, b = vectors.values()
    print(f"largest difference between the two runs' vectors: {np.abs(a - b).max():.1e}")


if __name__ == "__main__":
    main()
