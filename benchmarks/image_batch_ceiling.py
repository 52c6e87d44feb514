"""How much can micro-batching speed up image candidates on this CPU, with no server in the way?

Times magic-mm-tiny's candidate path for photos (vision encoder, connector, LM), through the
server's own batch pass (``Service._embed_raw``), per image, interleaved in each round:

- one image per call (what a one-at-a-time server does), on all intra-op threads;
- all images in one pass (a full micro-batch) on all intra-op threads (``image_workers=1``);
- all images split over two model threads of one intra-op thread each, as the server does by
  default (``image_workers=2``);
- one image per call on one thread (the per-core cost).

The batch/alone ratio is the ceiling for a micro-batching server on image requests: HTTP,
decoding and queueing only lower it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/image_batch_ceiling.py [--images 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from magic_mm import MagicEmbedder
from magic_mm.serve.app import Service
from magic_mm.serve.batcher import BatchSettings
from magic_mm.serve.limits import ServeSettings

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k-1k" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="magic-mm-tiny")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    model = MagicEmbedder.from_pretrained(args.model, dtype=args.dtype)
    paths = sorted(args.data.glob("*.jpg"))[: args.images]
    if len(paths) < 2:
        parser.error(f"--data {args.data}: needs at least 2 .jpg photos")
    items = model.prepare(paths)  # decoded and resized once: only the model is timed
    threads = torch.get_num_threads()

    def batch_pass(image_workers: int):  # noqa: ANN202
        service = Service(model, args.model, None, ServeSettings(batch=BatchSettings(image_workers=image_workers)))
        return lambda batch: service._embed_raw(batch, [("candidate", None)] * len(batch))  # the server's own pass

    encode, split = batch_pass(1), batch_pass(2)

    def per_image(fn, batch: list, n_threads: int) -> float:  # noqa: ANN001
        torch.set_num_threads(n_threads)
        start = time.perf_counter()
        fn(batch)
        return (time.perf_counter() - start) / len(batch)

    def one_by_one(batch: list) -> None:
        for item in batch:
            encode([item])

    variants = {
        f"one image per call, {threads} threads": (one_by_one, items[: max(2, len(items) // 2)], threads),
        f"{len(items)} images per call, {threads} threads": (encode, items, threads),
        f"{len(items)} images, split over two 1-thread workers": (split, items, threads),
        "one image per call, 1 thread": (one_by_one, items[: max(2, len(items) // 4)], 1),
    }
    encode(items[:2]), split(items[:2])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (fn, batch, n) in variants.items():
            times[name].append(per_image(fn, batch, n))
    torch.set_num_threads(threads)
    alone = statistics.median(times[next(iter(variants))])
    print(f"{args.model}, dtype {model.backbone.dtype}, {threads} intra-op threads, {args.rounds} rounds (medians)")
    print("| variant | ms per image | throughput vs one at a time |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.1f} | {alone / median:.2f}× |")


if __name__ == "__main__":
    main()
