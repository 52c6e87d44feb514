"""How many tiles should one vision-encoder call take on a CPU?  Times magic-mm-tiny's vision
encoder per image at several tiles per call, with the page faults per image (glibc maps a block
over 32 MiB afresh on every call, and the kernel zeroes each of its pages again), then whole
candidate encoding with the shipped cap (``cpu_vision_tiles_per_call``) against one call for
the whole batch, interleaved.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vision_batch.py [--dtype auto] [--reps 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

import magic_mm.model.backbones.base as base
from magic_mm import MagicEmbedder

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k-1k" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="magic-mm-tiny")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="encode() batch size")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    model = MagicEmbedder.from_pretrained(args.model, dtype=args.dtype)
    backbone = model.backbone
    pixels = torch.randn(16, 3, 448, 448).to(backbone.dtype)
    shipped = base.cpu_vision_tiles_per_call(pixels[0])
    sizes = (1, 2, 3, 4, 8, 16)
    per_image: dict[int, list[float]] = {n: [] for n in sizes}
    faults: dict[int, list[float]] = {n: [] for n in sizes}
    with torch.inference_mode():
        backbone.vision_grid(pixels[:2])  # warm-up
        for _ in range(args.reps):
            for n in sizes:
                start, faults_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for chunk in pixels.split(n):
                    backbone.vision_grid(chunk)
                per_image[n].append((time.perf_counter() - start) * 1000 / len(pixels))
                faults[n].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / len(pixels))
    print(f"vision encoder, {len(pixels)} tiles of 448 px, {backbone.dtype}, median of {args.reps}")
    print(f"{'tiles per call':>14} {'ms / image':>11} {'vs 16':>7} {'page faults / image':>20}")
    slowest = statistics.median(per_image[16])
    for n in sizes:
        ms = statistics.median(per_image[n])
        print(f"{n:>14} {ms:>11.1f} {slowest / ms:>6.2f}x {statistics.median(faults[n]):>20.0f}")

    paths = sorted(args.data.glob("*.jpg"))[: args.images]
    rates: dict[str, list[float]] = {f"{shipped} tiles per call": [], "one call per batch": []}
    shipped_limit = base.MALLOC_FRESH_MAPPING_BYTES
    model.encode(paths[:2], role="candidate")  # warm-up
    for _ in range(args.reps):
        for label, limit in ((f"{shipped} tiles per call", shipped_limit), ("one call per batch", 10**12)):
            base.MALLOC_FRESH_MAPPING_BYTES = limit
            start = time.perf_counter()
            model.encode(paths, role="candidate", batch_size=args.batch)
            rates[label].append(len(paths) / (time.perf_counter() - start))
    base.MALLOC_FRESH_MAPPING_BYTES = shipped_limit
    print(f"\nencode(): {len(paths)} photos as candidates, batch {args.batch}, median of {args.reps} interleaved reps")
    reference = statistics.median(rates["one call per batch"])
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"{label:>20} {rate:6.2f} images/s {rate / reference:5.2f}x")


if __name__ == "__main__":
    main()
