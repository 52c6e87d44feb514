"""Would a float32 start of the vision encoder win back bf16's recall loss, and at what speed?

magic-mm-tiny in bf16, except that EfficientNet-Lite0's stem and its first K MBConv blocks run
in float32 (K = 0 is the shipped bf16 model).  For each K: flickr8k-1k test text→image R@1/5/10
(bf16 queries, 216 candidates), the candidates' mean / min cosine to the float32 model's, and
candidate encoding speed on 32 photos, interleaved over K.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vision_precision.py [--blocks 0 1 3] [--cache-dir DIR]

An experiment, not a product setting: it swaps the vision encoder's ``features`` on the
instance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from dtype_parts_quality import Fixed, task_items  # noqa: E402

from magic_mm import MagicEmbedder  # noqa: E402
from magic_mm.eval.harness import EvalSettings, evaluate_rows, make_encoder  # noqa: E402
from magic_mm.model.inputs import MMInput  # noqa: E402


def mixed_features(fp32_net, bf16_net, blocks: int):  # noqa: ANN001, ANN201
    """The encoder's ``features`` with the stem and the first ``blocks`` blocks in float32."""

    def features(pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu6(fp32_net._bn0(fp32_net._conv_stem(pixels.float())))
        for block in fp32_net._blocks[:blocks]:
            x = block(x)
        x = x.to(torch.bfloat16)
        for block in bf16_net._blocks[blocks:]:
            x = block(x)
        return F.relu6(bf16_net._bn1(bf16_net._conv_head(x)))

    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=Path, default=Path(__file__).parent / "flickr8k-t2i.yaml")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    spec, rows, queries, pool = task_items(args.tasks)
    bf16_enc = make_encoder(EvalSettings(dtype="bfloat16", cache_root=args.cache_dir))
    fp32_enc = make_encoder(EvalSettings(dtype="float32", cache_root=args.cache_dir))
    q = bf16_enc.encode(queries, "query")
    reference = fp32_enc.encode(pool, "candidate")
    instruction = bf16_enc.instruction(pool[0], "candidate")
    inputs = [MMInput(text=i.text, image=i.image) for i in pool]

    fp32_net = MagicEmbedder.from_pretrained("magic-mm-tiny", dtype="float32").backbone.vision
    model = MagicEmbedder.from_pretrained("magic-mm-tiny", dtype="bfloat16")
    bf16_net = model.backbone.vision
    variants = {k: mixed_features(fp32_net, bf16_net, k) for k in args.blocks}

    print(f"{'fp32 blocks':>11} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'cos mean':>9} {'cos min':>8}")
    for k, features in variants.items():
        bf16_net.features = features
        c = model.encode(inputs, role="candidate", instruction=instruction, batch_size=16)
        metrics, _, _ = evaluate_rows(rows, Fixed({"query": (queries, q), "candidate": (pool, c)}), spec.mode)
        cos = (c * reference).sum(1)
        print(f"{k:>11} " + " ".join(f"{100 * metrics[f'recall@{n}']:6.2f}" for n in (1, 5, 10))
              + f" {cos.mean():9.5f} {cos.min():8.5f}")

    photos = [i.image for i in pool[:32]]
    rates: dict[int, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, features in variants.items():
            bf16_net.features = features
            start = time.perf_counter()
            model.encode(photos, role="candidate", batch_size=16)
            rates[k].append(len(photos) / (time.perf_counter() - start))
    base = statistics.median(rates[args.blocks[0]])
    print(f"\ncandidate encoding, {len(photos)} photos, batch 16, median of {args.reps} interleaved reps")
    for k, values in rates.items():
        rate = statistics.median(values)
        print(f"{k:>11} fp32 blocks: {rate:6.2f} images/s ({rate / base:.2f}x of {args.blocks[0]} blocks)")


if __name__ == "__main__":
    main()
