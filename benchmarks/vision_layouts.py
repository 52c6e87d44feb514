"""EfficientNet-Lite0 at 448 px: ms per image for each inference change of issue 10, interleaved.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vision_layouts.py [--batch 4] [--reps 3]

Variants: as at a8da1f2 (NCHW, BatchNorm, "same" padding by F.pad), BatchNorm folded,
channels-last unfolded, folded + channels-last, + bf16 autocast, + bf16 weights.
Prints the median ms per image and the speed-up over the first row.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from magic_mm.model import efficientnet_lite as E


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    plain = E.load_variant("efficientnet-lite0")
    folded = E.load_variant("efficientnet-lite0", fold=True)
    nchw = torch.randn(args.batch, 3, 448, 448)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    folded_cl = copy.deepcopy(folded).to(memory_format=torch.channels_last)
    bf16 = copy.deepcopy(folded_cl).to(torch.bfloat16)

    def autocast() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return folded_cl.features(nhwc)

    variants = {
        "unfolded, NCHW (a8da1f2 layout)": lambda: plain.features(nchw),
        "folded, NCHW": lambda: folded.features(nchw),
        "unfolded, channels_last": lambda: plain_cl.features(nhwc),
        "folded, channels_last": lambda: folded_cl.features(nhwc),
        "folded, channels_last, bf16 autocast": autocast,
        "folded, channels_last, bf16 weights": lambda: bf16.features(nhwc.bfloat16()),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up: oneDNN builds its kernels on the first call
            fn()
        for _ in range(args.reps):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000.0 / args.batch)
    base = statistics.median(times[next(iter(variants))])
    print(f"batch {args.batch}, 448 px, {args.reps} interleaved reps, torch threads {torch.get_num_threads()}")
    print(f"{'variant':40} {'ms/image':>9} {'speed-up':>9}")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name:40} {ms:9.1f} {base / ms:8.2f}x")


if __name__ == "__main__":
    main()
