"""Why a batched bf16 answer differs from the same request alone: does one row of a bf16 matmul
come out bit-identical whatever other rows share the call?

Multiplies the first M rows of one random (2048 × 576) bf16 input by a SmolLM2-shaped
(576 → 1536) weight, for several M, and compares them with the same rows computed inside the
full 2048-row call, at each intra-op thread count.  Any non-zero difference means the CPU's
kernel (and its summation order) depends on how many rows a call has, so a vector computed in a
micro-batch cannot be guaranteed to equal the one computed alone.

    .venv/bin/python benchmarks/bf16_row_invariance.py            # F.linear
    .venv/bin/python benchmarks/bf16_row_invariance.py --packed   # the LM's PackedLinear (bf16 only)
"""

from __future__ import annotations

import argparse

import torch

from magic_mm.model.packed_linear import pack_linears

ROWS = (1, 8, 22, 44, 64, 128, 352, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-features", type=int, default=576)
    parser.add_argument("--out-features", type=int, default=1536)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--packed", action="store_true", help="multiply through PackedLinear (weight packed once)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(args.in_features, args.out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(args.out_features, args.in_features, generator=generator))
    layer = layer.to(dtype).requires_grad_(False)
    if args.packed:
        pack_linears(layer)
    rows = torch.randn(2048, args.in_features, generator=generator).to(dtype)
    threads = sorted({1, torch.get_num_threads()})
    kind = "PackedLinear" if args.packed else "linear"
    print(f"{args.dtype} {kind} {args.in_features} → {args.out_features}: largest |difference| of the first M rows "
          "against the same rows inside a 2048-row call")
    print("| M | " + " | ".join(f"{n} thread{'s' if n > 1 else ''}" for n in threads) + " |")
    print("|---:|" + "---:|" * len(threads))
    results: dict[int, list[float]] = {m: [] for m in ROWS}
    for n in threads:
        torch.set_num_threads(n)
        full = layer(rows).float()
        for m in ROWS:
            part = layer(rows[:m]).float()
            results[m].append((part - full[:m]).abs().max().item())
    for m, diffs in results.items():
        print(f"| {m} | " + " | ".join(f"{d:.3g}" for d in diffs) + " |")


if __name__ == "__main__":
    main()
