"""Turning resized photos into the vision encoder's input batch: the NCHW arithmetic magic-mm used
before (normalise a strided view, concatenate, convert to bf16, change to channels-last) against
the shipped path (normalise the HWC array in place, convert while copying into a channels-last
batch), interleaved, on one thread as an image worker runs it. Both give the same bits.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tile_pixels.py [--photos 8] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from magic_mm.model import efficientnet_lite

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k-1k" / "images"
SIZE = 448


def before(images: list[Image.Image]) -> torch.Tensor:
    mean = torch.tensor(efficientnet_lite.PIXEL_MEAN)[:, None, None]
    std = torch.tensor(efficientnet_lite.PIXEL_STD)[:, None, None]
    tiles = [((torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std)[None]
             for image in images]
    return torch.cat(tiles).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def shipped(images: list[Image.Image]) -> torch.Tensor:
    tiles = [efficientnet_lite.image_pixels(image, SIZE) for image in images]
    batch = torch.empty((len(tiles), 3, SIZE, SIZE), dtype=torch.bfloat16, memory_format=torch.channels_last)
    for i, tile in enumerate(tiles):  # as Backbone.vision_features does
        batch[i : i + 1].copy_(tile)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = [efficientnet_lite.resize_square(Image.open(p).convert("RGB"), SIZE)
              for p in sorted(args.data.glob("*.jpg"))[: args.photos]]
    if not torch.equal(before(images), shipped(images)):
        raise SystemExit("the two paths give different pixels")
    times: dict[str, list[float]] = {"before": [], "shipped": []}
    for r in range(args.rounds):
        for name, fn in (("before", before), ("shipped", shipped))[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            fn(images)
            times[name].append((time.perf_counter() - start) * 1000 / len(images))
    old, new = statistics.median(times["before"]), statistics.median(times["shipped"])
    print(f"{len(images)} photos resized to {SIZE} px, 1 thread, median of {args.rounds} interleaved rounds; equal bits")
    print("| path | ms per photo |\n|---|---:|")
    print(f"| NCHW view, cat, bf16, channels-last | {old:.2f} |\n| in place on HWC, copied into the batch | {new:.2f} |")
    print(f"shipped / before: {old / new:.2f}× faster")


if __name__ == "__main__":
    main()
