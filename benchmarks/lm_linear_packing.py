"""What packing the LM's bf16 weights for oneDNN buys, interleaved in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_linear_packing.py [--rounds 3]

Part 1 times one matrix product per SmolLM2-135M shape (K × N), for the row counts an embedder
sees (M: a 22-token query, a 58-token s = 2 candidate, a 205-token s = 1 candidate, a batch of
16 candidates), as ``F.linear`` and with the weight packed once. Part 2 times ``magic-mm-tiny``
(bf16) end to end with its packed linears, and with them switched back to ``F.linear``: one text
query per call, one photo per call, and 16 photos per call. Photos are decoded beforehand.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from magic_mm import MagicEmbedder
from magic_mm.model.packed_linear import PackedLinear

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k-1k"
SHAPES = ((576, 1536), (1536, 576), (576, 576), (576, 192))  # gate/up, down, q/o, k/v
ROWS = (22, 58, 205, 928)


def median_ms(fn: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


@contextlib.contextmanager
def plain_linears() -> Iterator[None]:
    """Every PackedLinear runs ``F.linear`` meanwhile (its packed path reports "not applicable")."""
    packed = PackedLinear._packed_weight
    PackedLinear._packed_weight = lambda self, x: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        PackedLinear._packed_weight = packed  # type: ignore[method-assign]


def products(rounds: int, dtype: torch.dtype) -> None:
    print(f"{dtype}, {torch.get_num_threads()} threads, {rounds} interleaved rounds (medians)")
    print("| K × N | M | F.linear µs | packed µs | packed speed-up |")
    print("|---|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for k, n in SHAPES:
        weight = torch.randn(n, k, dtype=dtype) * 0.05
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        for m in ROWS:
            x = torch.randn(m, k, dtype=dtype)
            plain_fn = lambda: F.linear(x, weight)  # noqa: E731
            packed_fn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
            plain_fn(), packed_fn()
            plain, fast = [], []
            for _ in range(rounds):
                plain.append(median_ms(plain_fn, 30) * 1000)
                fast.append(median_ms(packed_fn, 30) * 1000)
            a, b = statistics.median(plain), statistics.median(fast)
            print(f"| {k} × {n} | {m} | {a:.0f} | {b:.0f} | {a / b:.2f}× |")


def end_to_end(rounds: int) -> None:
    model = MagicEmbedder.from_pretrained("magic-mm-tiny", dtype="bfloat16")
    paths = sorted((DATA / "images").glob("*.jpg"))[:16]
    photos = [Image.open(p).convert("RGB") for p in paths]
    queries = [line.split(",", 1)[1].strip().strip('"')
               for line in (DATA / "captions.csv").read_text().splitlines()[1:9]]
    jobs = {
        "one text query per call (ms)": lambda: [model.encode([q], role="query") for q in queries],
        "one photo per call (ms / photo)": lambda: [model.encode([p], role="candidate") for p in photos[:4]],
        "16 photos per call (ms / photo)": lambda: model.encode(photos, role="candidate", batch_size=16),
    }
    per_call = {"one text query per call (ms)": len(queries), "one photo per call (ms / photo)": 4,
                "16 photos per call (ms / photo)": 16}
    times: dict[tuple[str, str], list[float]] = {}
    for fn in jobs.values():  # warm-up, both ways
        fn()
        with plain_linears():
            fn()
    for r in range(rounds):
        for variant in (["packed", "F.linear"] if r % 2 == 0 else ["F.linear", "packed"]):
            for name, fn in jobs.items():
                with plain_linears() if variant == "F.linear" else contextlib.nullcontext():
                    ms = median_ms(fn, 1) / per_call[name]
                times.setdefault((name, variant), []).append(ms)
    print(f"\nmagic-mm-tiny, bf16, {torch.get_num_threads()} threads, {rounds} interleaved rounds (medians)")
    print("| job | F.linear | packed | speed-up |")
    print("|---|---:|---:|---:|")
    for name in jobs:
        a, b = statistics.median(times[(name, "F.linear")]), statistics.median(times[(name, "packed")])
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-products", action="store_true")
    parser.add_argument("--products-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="part 1's dtype (float32: would packing help a CPU without bf16?)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    if not args.skip_products:
        products(args.rounds, getattr(torch, args.products_dtype))
    if not args.skip_end_to_end:
        end_to_end(args.rounds)


if __name__ == "__main__":
    main()
