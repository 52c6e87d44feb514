"""What fixed row blocks cost the packed bf16 products, and what they buy: batch invariance.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/row_blocks.py [--rounds 5]

``magic-mm-tiny`` in bf16 with its ``PackedLinear``s run three ways, interleaved in one run: every
product as one oneDNN call of the rows that come (``ROW_BLOCK = None``); the rows padded to a
multiple of ``ROW_BLOCK`` and run in calls of at most 128 rows (``CALL_ROWS = 128``, the fixed cap
before the caps were measured per shape); and the default, calls of at most each shape's
``invariant_call_rows``.
Timed: one text query per call, one photo per call, 16 photos per call, and 16 photos split
over two model threads of one intra-op thread each, as the server runs an image pass (the
measured caps differ by thread count). Then, for each way, the largest difference of any vector component between
inputs embedded alone and the same inputs inside one call with others: 16 photos, and 16
captions of different lengths (right-padded in one batch).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from magic_mm import MagicEmbedder
from magic_mm.model import packed_linear
from magic_mm.serve.app import Service
from magic_mm.serve.batcher import BatchSettings
from magic_mm.serve.limits import ServeSettings

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k-1k"
BLOCKED = packed_linear.ROW_BLOCK
# (ROW_BLOCK, CALL_ROWS) for each way
WAYS = {"one call per product": (None, None), "blocks, 128-row calls": (BLOCKED, 128),
        "blocks, measured calls": (BLOCKED, None)}


def use(way: str) -> None:
    packed_linear.ROW_BLOCK, packed_linear.CALL_ROWS = WAYS[way]


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def largest_batch_difference(model: MagicEmbedder, items: list, role: str) -> float:
    together = model.encode(items, role=role, batch_size=len(items), normalize=False)
    alone = np.concatenate([model.encode([item], role=role, normalize=False) for item in items])
    return float(np.abs(together - alone).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = MagicEmbedder.from_pretrained("magic-mm-tiny", dtype="bfloat16")
    photos = [Image.open(p).convert("RGB") for p in sorted((DATA / "images").glob("*.jpg"))[:16]]
    captions = [line.split(",", 1)[1].strip().strip('"')
                for line in (DATA / "captions.csv").read_text().splitlines()[1:17]]
    server = Service(model, "magic-mm-tiny", None, ServeSettings(batch=BatchSettings(image_workers=2)))
    prepared = model.prepare(photos)
    jobs: dict[str, tuple[Callable[[], object], int]] = {
        "one text query per call (ms)": (lambda: [model.encode([c], role="query") for c in captions[:8]], 8),
        "one photo per call (ms / photo)": (lambda: [model.encode([p], role="candidate") for p in photos[:4]], 4),
        "16 photos per call (ms / photo)": (lambda: model.encode(photos, role="candidate", batch_size=16), 16),
        "16 photos, two 1-thread workers (ms / photo)":
            (lambda: server._embed_raw(prepared, [("candidate", None)] * len(prepared)), 16),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for way in WAYS:  # warm-up (and each shape's call cap measured)
        use(way)
        for fn, _ in jobs.values():
            fn()
    for r in range(args.rounds):
        for way in (list(WAYS) if r % 2 == 0 else list(WAYS)[::-1]):
            use(way)
            for name, (fn, calls) in jobs.items():
                times.setdefault((name, way), []).append(timed_ms(fn) / calls)
    plain, fixed, measured = WAYS
    print(f"magic-mm-tiny, bf16, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds (medians)")
    print(f"| job | {plain} | {fixed} | {measured} | {measured} / {plain} | 128-row / measured |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in jobs:
        a, b, c = (statistics.median(times[(name, way)]) for way in WAYS)
        print(f"| {name} | {a:.1f} | {b:.1f} | {c:.1f} | {c / a:.2f}× | {b / c:.2f}× |")
    print("\nlargest |difference|, embedded alone against inside a call of 16")
    print(f"| inputs | {' | '.join(WAYS)} |")
    print("|---|" + "---:|" * len(WAYS))
    for label, items, role in (("16 photos", photos, "candidate"), ("16 captions", captions, "query")):
        cells = []
        for way in WAYS:
            use(way)
            cells.append(f"{largest_batch_difference(model, items, role):.3g}")
        print(f"| {label} | {' | '.join(cells)} |")
    use(measured)
    server.close()


if __name__ == "__main__":
    main()
