"""Where the model is loaded changes the server's speed: torch's OpenMP teams, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/openmp_teams.py [--rounds 3] [--requests 12]

libgomp keeps a team of worker threads for every thread that has run a parallel torch op, and
spins between parallel regions only while the teams hold no more threads than there are cores.
The server runs its passes on the batcher's thread, so a model loaded (with all intra-op
threads) on the main thread leaves two teams, and every op of every pass pays a futex wake-up.
``magic-mm serve`` therefore loads on a thread that then ends (``load_on_own_thread``).

Each round starts one fresh process per variant, alternating which goes first:

- ``loaded on the main thread``: ``MagicEmbedder.from_pretrained`` called directly;
- ``loaded on its own thread``: as ``magic-mm serve`` does.

Each process serves magic-mm-tiny on 127.0.0.1 (one request at a time, ``max_batch`` 1), and one
client sends --requests photos (flickr8k-1k, one per request) and as many one-line queries,
each alone, after a warm-up. Printed: ms per request (medians over rounds) and the ratio, and
the cost of one small parallel op (a 58 × 576 add) on the main thread and on a new thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO.parent / "shared" / "data" / "flickr8k-1k" / "images"
VARIANTS = {"main": "loaded on the main thread", "own": "loaded on its own thread"}


def small_op_us(x) -> float:  # noqa: ANN001
    for _ in range(100):
        x.add(x)
    start = time.perf_counter()
    for _ in range(2000):
        x.add(x)
    return (time.perf_counter() - start) / 2000 * 1e6


def child(variant: str, requests: int) -> None:
    import threading

    import torch

    from magic_mm import MagicEmbedder
    from magic_mm.serve.app import create_app, load_on_own_thread
    from magic_mm.serve.batcher import BatchSettings
    from magic_mm.serve.limits import ServeSettings
    from magic_mm.serve.loadgen import file_data_url, image_mix, post, text_mix
    from magic_mm.serve.runner import ServerThread

    load = lambda: MagicEmbedder.from_pretrained("magic-mm-tiny")  # noqa: E731
    embedder = load() if variant == "main" else load_on_own_thread(load)
    x = torch.randn(58, 576)
    on_thread: list[float] = []
    probe = threading.Thread(target=lambda: on_thread.append(small_op_us(x)))
    probe.start(), probe.join()
    photos = image_mix([file_data_url(str(p)) for p in sorted(PHOTOS.glob("*.jpg"))[:requests]])
    queries = text_mix()[:requests]
    app = create_app(embedder, "magic-mm-tiny", None, ServeSettings(batch=BatchSettings(max_batch=1)))
    result = {"new thread add µs": on_thread[0]}
    with ServerThread(app) as server:
        for name, mix in (("photo", photos), ("query", queries)):
            post(server.url, *mix[0])
            start = time.perf_counter()
            for path, body in mix:
                status, _, _ = post(server.url, path, body)
                assert status == 200, status
            result[f"{name} ms"] = (time.perf_counter() - start) / len(mix) * 1000
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests)
        return
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in (VARIANTS if r % 2 == 0 else reversed(VARIANTS)):
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--requests", str(args.requests)],
                                 capture_output=True, text=True, check=True).stdout
            results[variant].append(json.loads(out.split("RESULT ", 1)[1]))
            print(f"  round {r + 1} {VARIANTS[variant]}: {results[variant][-1]}", flush=True)
    keys = list(results["main"][0])
    print(f"\nmagic-mm-tiny, one request at a time, {args.rounds} rounds (medians)")
    print("| | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    medians = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in results.items()}
    for variant, row in medians.items():
        print(f"| {VARIANTS[variant]} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    print("| main / own | " + " | ".join(f"{medians['main'][k] / medians['own'][k]:.2f}×" for k in keys) + " |")


if __name__ == "__main__":
    main()
