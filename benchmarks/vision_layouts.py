"""EfficientNet-Lite0 at 448 px: ms per image for each inference change of issue 10, interleaved.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vision_layouts.py [--batch 4] [--reps 3]

Variants: as at a8da1f2 (NCHW, BatchNorm), BatchNorm folded, channels-last unfolded,
folded + channels-last, + bf16 autocast, + bf16 weights. The rows marked "padded input,
clamp apart" run the convolutions as before the last speed-up: TF "same" padding by an
``F.pad`` of the input and ReLU6 as its own clamp. The last three rows split that speed-up
into its two parts: the grown kernel instead of the padded input, then the fused clamp.
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

    def as_before(net: E.EfficientNetLite0, pixels: torch.Tensor, pad_input: bool = True) -> torch.Tensor:
        """``net.features`` with ReLU6 as its own clamp after each convolution and, with
        ``pad_input``, TF "same" padding by ``F.pad`` of the input (the code before both)."""
        saved = E.fused_relu6_applies, E.SameConv2d.forward
        E.fused_relu6_applies = lambda conv, x: False  # conv_relu6 looks it up on every call
        if pad_input:
            E.SameConv2d.forward = E.conv_with_padded_input
        try:
            return net.features(pixels)
        finally:
            E.fused_relu6_applies, E.SameConv2d.forward = saved

    variants = {
        "unfolded, NCHW (a8da1f2 layout)": lambda: as_before(plain, nchw),
        "folded, NCHW": lambda: as_before(folded, nchw),
        "unfolded, channels_last": lambda: as_before(plain_cl, nhwc),
        "folded, channels_last": lambda: as_before(folded_cl, nhwc),
        "folded, channels_last, now": lambda: folded_cl.features(nhwc),
        "folded, channels_last, now, bf16 autocast": autocast,
        "bf16 weights, padded input, clamp apart": lambda: as_before(bf16, nhwc.bfloat16()),
        "bf16 weights, grown kernel, clamp apart": lambda: as_before(bf16, nhwc.bfloat16(), pad_input=False),
        "bf16 weights, grown kernel, fused clamp (now)": lambda: bf16.features(nhwc.bfloat16()),
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
    print(f"{'variant':46} {'ms/image':>9} {'speed-up':>9}")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name:46} {ms:9.1f} {base / ms:8.2f}x")


if __name__ == "__main__":
    main()
