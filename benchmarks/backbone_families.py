"""Visual tokens and candidate latency, s = 1 against s = 2, for the MLLM backbone families
at their real sizes (random init: speed needs no trained weights).

    nice -n 10 .venv/bin/python benchmarks/backbone_families.py --models qwen2_vl smolvlm --reps 3

For each model, one at a time (a 2B model is ~9 GB in fp32): build the full-size
random-init config from its backbone file, embed one natural image as a
*candidate* at batch 1 (``encode([image], role="candidate")``: processor, vision
tower, compression, connector, LM), and time it with ``none`` and ``bilinear:2``
swapped on the same weights.  Repetitions are interleaved (s = 1, s = 2, s = 1, …)
so drift and other load on the machine hit both alike; one untimed warm-up run of
each comes first.  Prints a table of medians and ratios; ``--json`` writes the
raw numbers too.  Note: a byte-level tokenizer (with the image / tile markers as
single tokens) stands in for the real one, so the prompt's plain text costs a few
more tokens than with the real tokenizer (the same for s = 1 and s = 2).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from magic_mm import MagicEmbedder  # noqa: E402
from magic_mm.model.backbones import idefics3, qwen_vl  # noqa: E402
from magic_mm.model.compression import Compression  # noqa: E402
from magic_mm.model.config import EmbedderConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "flickr8k-1k"
# model name → (family, published shape, spec builder)
MODELS: dict[str, tuple[str, str, Any]] = {
    "qwen2_vl": ("qwen_vl", "Qwen2-VL-2B", lambda a: qwen_vl.full_size_spec("qwen2_vl", a.max_pixels)),
    "qwen2_5_vl": ("qwen_vl", "Qwen2.5-VL-3B", lambda a: qwen_vl.full_size_spec("qwen2_5_vl", a.max_pixels)),
    "qwen3_vl": ("qwen_vl", "Qwen3-VL-2B", lambda a: qwen_vl.full_size_spec("qwen3_vl", a.max_pixels)),
    "smolvlm": ("idefics3", "SmolVLM-256M", lambda a: idefics3.full_size_spec("smolvlm", a.longest_edge)),
    "idefics3": ("idefics3", "Idefics3-8B", lambda a: idefics3.full_size_spec("idefics3", a.longest_edge)),
}
VARIANTS = ("none", "bilinear:2")


@dataclass
class Row:
    model: str
    shape: str
    parameters: int
    image_size: str
    budget: str  # the token-budget setting (Qwen-VL max_pixels, Idefics3 longest_edge)
    tiles: int
    tokens: dict[str, int]
    candidate_seq_len: dict[str, int]
    latency_s: dict[str, list[float]]
    load_s: float

    def median(self, variant: str) -> float | None:
        return statistics.median(self.latency_s[variant]) if self.latency_s[variant] else None


def natural_image(width: int, height: int) -> Image.Image:
    """The first flickr8k-1k photo resized to the benchmark size (a seeded noise image without the data)."""
    images = sorted((DATA / "images").glob("*.jpg")) if (DATA / "images").is_dir() else []
    if images:
        return Image.open(images[0]).convert("RGB").resize((width, height), Image.BICUBIC)
    import numpy as np

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def bench_model(name: str, args: argparse.Namespace, image: Image.Image) -> Row:
    family, shape, spec = MODELS[name]
    started = time.perf_counter()
    config = EmbedderConfig(family=family, backbone=spec(args), name=f"{shape} (random init)")
    model = MagicEmbedder.from_config(config, "none").eval()
    load_s = time.perf_counter() - started
    backbone = model.backbone
    width, height = image.size
    tokens, seq_len = {}, {}
    for variant in VARIANTS:
        backbone.compression = Compression.parse(variant)
        tokens[variant] = backbone.visual_tokens(width, height)
        prepared = model.prepare([image])[0]
        with torch.inference_mode():
            seq_len[variant] = int(model.lm_batch([prepared], "candidate").lengths[0])
    timings: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(-1 if args.reps else 0, args.reps):  # rep -1: untimed warm-up; --reps 0: tokens only
        for variant in VARIANTS:
            backbone.compression = Compression.parse(variant)
            t0 = time.perf_counter()
            model.encode([image], role="candidate", batch_size=1)
            elapsed = time.perf_counter() - t0
            if rep >= 0:
                timings[variant].append(elapsed)
            print(f"  {name} {variant:<11} rep {rep:>2}: {elapsed:7.2f} s", file=sys.stderr, flush=True)
    vision = backbone.describe_parts()["vision"]
    budget = next(f"{k}={vision[k]}" for k in ("max_pixels", "longest_edge") if k in vision)
    row = Row(name, shape, sum(p.numel() for p in model.parameters()), f"{width}x{height}", budget,
              len(backbone.tiles_for_size(width, height)), tokens, seq_len, timings, round(load_s, 1))
    del model, backbone
    gc.collect()
    return row


def table(rows: list[Row]) -> str:
    s1, s2 = VARIANTS
    lines = [
        "| family (shape, random init) | params | image | budget | tiles | visual tokens s=1 → s=2 "
        "| candidate seq len s=1 → s=2 | candidate latency s=1 | s=2 | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {MODELS[r.model][0]} ({r.shape}) | {r.parameters / 1e9:.2f} B | {r.image_size} | {r.budget} "
            f"| {r.tiles} "
            f"| {r.tokens[s1]} → {r.tokens[s2]} ({r.tokens[s1] / r.tokens[s2]:.1f}× fewer) "
            f"| {r.candidate_seq_len[s1]} → {r.candidate_seq_len[s2]} "
            + (f"| {r.median(s1):.2f} s | {r.median(s2):.2f} s | {r.median(s1) / r.median(s2):.2f}× |"
               if r.median(s1) and r.median(s2) else "| – | – | – |")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen2_vl", "smolvlm"], choices=sorted(MODELS))
    parser.add_argument("--image-size", default="448x448", help="WIDTHxHEIGHT of the candidate image")
    parser.add_argument("--reps", type=int, default=3,
                        help="timed, interleaved repetitions per variant (0: tokens only)")
    parser.add_argument("--max-pixels", type=int, default=None, help="Qwen-VL pixel budget (default: processor's)")
    parser.add_argument("--longest-edge", type=int, default=None,
                        help="Idefics3/SmolVLM resize target before tiling (default: the model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    image = natural_image(width, height)
    rows = []
    for name in args.models:
        print(f"{name}: building the full-size random-init model …", file=sys.stderr, flush=True)
        rows.append(bench_model(name, args, image))
    print(f"\nCPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"fp32, batch 1, median of {args.reps} interleaved reps after one warm-up; "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
