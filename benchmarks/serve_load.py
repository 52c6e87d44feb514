"""Load on the HTTP server: 16 clients × 20 mixed requests, with and without micro-batching, in one run.

    .venv/bin/python benchmarks/serve_load.py --db magic.lance           # the demo's index, its model
    .venv/bin/python benchmarks/serve_load.py --model tiny-random-composed  # no index: embeddings only

Each distinct request is first sent alone (unmeasured: warm-up, and the reference
answers).  Then both passes send the same load to a server on 127.0.0.1 with the same
model: one request at a time through the model (max_batch=1), then micro-batched
(max_batch=32, max_wait 10 ms).  Every answer is checked against the reference.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from magic_mm.serve.app import create_app
from magic_mm.serve.batcher import BatchSettings
from magic_mm.serve.limits import ServeSettings
from magic_mm.serve.loadgen import check_answers, post, request_mix, run_load
from magic_mm.serve.runner import ServerThread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=None, help="index for the search requests")
    parser.add_argument("--model", default=None, help="default: the index's model, else magic-mm-tiny")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    args = parser.parse_args()

    from magic_mm import MagicEmbedder
    from magic_mm.index.search import check_same_model
    from magic_mm.index.store import PageStore

    store = PageStore.open(args.db) if args.db else None
    model = args.model or (store.stamp.model if store else "magic-mm-tiny")
    embedder = MagicEmbedder.from_pretrained(model)
    if store is not None:
        check_same_model(store, embedder, model)
    mix = request_mix(with_search=store is not None)

    results, reference = {}, []
    for name, max_batch in (("one at a time", 1), ("micro-batched", args.max_batch)):
        settings = ServeSettings(batch=BatchSettings(max_batch=max_batch, max_wait_ms=args.max_wait_ms,
                                                     max_queue=4 * args.clients))
        app = create_app(embedder, model, store, settings)
        with ServerThread(app) as server:
            if not reference:  # each distinct request alone, unmeasured: the reference answers, and a warm-up
                reference = [post(server.url, path, body)[1] for path, body in mix]
            result = run_load(server.url, mix, args.clients, args.per_client)
        stats = app.state.service.batcher.stats
        results[name] = (result, statistics.mean(stats.sizes) if stats.sizes else 0.0)
        print(f"{name}: {result.summary()}", flush=True)

    serial, batched = results["one at a time"][0], results["micro-batched"][0]
    mismatches = {name: len(check_answers(result, mix, reference)) for name, (result, _) in results.items()}

    print(f"\n{model} · {args.clients} clients × {args.per_client} requests · mix of {len(mix)} distinct requests "
          f"(texts, images, image+text, dimensions, base64{', search' if store else ''})\n")
    print("| server | requests | errors | median latency (ms) | p95 latency (ms) | requests/s | inputs per forward pass |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (result, mean_batch) in results.items():
        s = result.summary()
        print(f"| {name} | {s['requests']} | {s['errors']} | {s['median_ms']} | {s['p95_ms']} | "
              f"{s['requests_per_s']} | {mean_batch:.1f} |")
    print(f"\nmicro-batching throughput gain: {batched.throughput / serial.throughput:.2f}× · answers differing "
          "from the single-request answer: " + ", ".join(f"{k} {v}" for k, v in mismatches.items()))


if __name__ == "__main__":
    main()
