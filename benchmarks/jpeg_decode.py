"""Phone-sized JPEGs: decoded in full, or at libjpeg's reduced scale down to the model's size.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/jpeg_decode.py [--photos 32] [--rounds 3]

Makes ``--photos`` 4032 × 3024 JPEGs (quality 90, a 12-megapixel phone photo's size) from
flickr8k-1k photos in a temporary folder, then, interleaved in each round:

- decoding and resizing one photo as ``encode`` prepares it (``load_image`` + ``prepare_image``),
  in full and at the reduced scale (``Backbone.decode_size``; 1/4 here, 1008 × 756);
- ``encode(paths, role="candidate", batch_size=16)`` end to end, both ways.

Then the cosine between each photo's two vectors.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from magic_mm import MagicEmbedder
from magic_mm.model.inputs import load_image

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k-1k" / "images"
PHONE = (4032, 3024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="magic-mm-tiny")
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = MagicEmbedder.from_pretrained(args.model)
    backbone = model.backbone
    size = backbone.decode_size
    if size is None:
        parser.error(f"--model {args.model}: its backbone decodes every image in full (no decode_size)")
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, source in enumerate(sorted(DATA.glob("*.jpg"))[: args.photos]):
            paths.append(Path(folder) / f"phone{i:03d}.jpg")
            Image.open(source).convert("RGB").resize(PHONE, Image.BICUBIC).save(paths[-1], quality=90)
        ways = {"full decode": None, f"reduced scale (≥ {size[0]} × {size[1]})": size}
        prepare_ms: dict[str, list[float]] = {way: [] for way in ways}
        rate: dict[str, list[float]] = {way: [] for way in ways}
        vectors: dict[str, np.ndarray] = {}
        for r in range(args.rounds):
            for way, decode_size in (list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]):
                start = time.perf_counter()
                for path in paths[:8]:
                    backbone.prepare_image(load_image(path, decode_size=decode_size))
                prepare_ms[way].append((time.perf_counter() - start) * 1000 / 8)
                # the backbone's size, or None: the same model decoding in full
                with mock.patch.object(type(backbone), "decode_size", decode_size):
                    start = time.perf_counter()
                    vectors[way] = model.encode(paths, role="candidate", batch_size=16)
                    rate[way].append(len(paths) / (time.perf_counter() - start))
    full, reduced = ways
    print(f"{args.model}, {len(paths)} JPEGs of {PHONE[0]} × {PHONE[1]}, {args.rounds} interleaved rounds (medians)")
    print("| decoding | decode + resize ms / photo | encode images/s, batch 16 |")
    print("|---|---:|---:|")
    for way in ways:
        print(f"| {way} | {statistics.median(prepare_ms[way]):.1f} | {statistics.median(rate[way]):.2f} |")
    cosine = (vectors[full] * vectors[reduced]).sum(1)
    print(f"reduced / full: decode {statistics.median(prepare_ms[full]) / statistics.median(prepare_ms[reduced]):.2f}× "
          f"faster, encode {statistics.median(rate[reduced]) / statistics.median(rate[full]):.2f}× faster; "
          f"cosine between the two vectors of a photo: mean {cosine.mean():.5f}, min {cosine.min():.5f}")


if __name__ == "__main__":
    main()
