"""What do the stored instruction-line states save? (``lm_batch.PrefixStates``)

Every prompt of a task opens with the same instruction line ("Instruct: Find me an everyday
image that matches the given query.\\n" is 15 of a short query's 35 tokens).  A model loaded
for inference keeps that line's keys and values and runs only the rest of each prompt.

Times magic-mm-tiny's model pass (inputs decoded and resized once, so only the model is timed)
with the stored states and with every token run, interleaved in each round, for:

- one query per call (a search's latency), and a batch of 16 queries;
- one photo per call, and a batch of 16 photos (indexing, the server's micro-batches);
- a batch of 8 queries and 8 photos, as the server's micro-batcher forms it.

It also checks that both give the same vectors.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/instruction_states.py [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

from magic_mm import MagicEmbedder

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k-1k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="magic-mm-tiny")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args()
    model = MagicEmbedder.from_pretrained(args.model, dtype=args.dtype)
    photos = sorted((args.data / "images").glob("*.jpg"))[:16]
    with open(args.data / "captions.csv", newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)][:16]
    if len(photos) < 16 or len(captions) < 16:
        parser.error(f"--data {args.data}: needs images/*.jpg and captions.csv with 16 of each")
    queries = model.prompts(model.prepare(captions), "query")
    candidates = model.prompts(model.prepare(photos), "candidate")
    # The same photos prepared as the server does (resized) so that only the model is timed.
    candidates = [[model.backbone.prepare_image(s) if not isinstance(s, str) else s for s in p] for p in candidates]
    workloads = {
        "1 query per call": [queries[i : i + 1] for i in range(8)],  # 8 calls a round: lone calls are noisy
        "16 queries per call": [queries],
        "1 photo per call": [candidates[i : i + 1] for i in range(4)],
        "16 photos per call": [candidates],
        "8 queries + 8 photos per call": [queries[:8] + candidates[:8]],
    }
    stored = model.prefix_states
    variants = {"every token": None, "stored instruction": stored}

    def run(calls: list, states) -> tuple[float, torch.Tensor]:  # noqa: ANN001
        model.prefix_states = states
        start = time.perf_counter()
        with torch.inference_mode():
            out = torch.cat([model.embed_prompts(prompts) for prompts in calls])
        return time.perf_counter() - start, out

    for states in variants.values():  # warm-up, and the stored states computed once
        for calls in workloads.values():
            run(calls, states)
    times = {(w, v): [] for w in workloads for v in variants}
    gaps = {}
    for _ in range(args.rounds):
        for workload, calls in workloads.items():
            outs = {}
            for variant, states in variants.items():
                seconds, outs[variant] = run(calls, states)
                times[workload, variant].append(seconds / sum(len(p) for p in calls))
            gaps[workload] = float((outs["every token"] - outs["stored instruction"]).abs().max())
    model.prefix_states = stored
    medians = {f"{w} | {v}": 1000 * statistics.median(t) for (w, v), t in times.items()}
    if args.json:
        print(json.dumps({"ms_per_input": medians, "max_abs_gap": gaps}, indent=2))
        return
    print(f"{args.model}, dtype {model.backbone.dtype}, {torch.get_num_threads()} threads, {args.rounds} rounds (medians)")
    print("| workload | every token, ms/input | stored instruction, ms/input | speed-up | max |Δ| |")
    print("|---|---:|---:|---:|---:|")
    for workload in workloads:
        full = medians[f"{workload} | every token"]
        fast = medians[f"{workload} | stored instruction"]
        print(f"| {workload} | {full:.1f} | {fast:.1f} | {full / fast:.2f}× | {gaps[workload]:.1e} |")


if __name__ == "__main__":
    main()
