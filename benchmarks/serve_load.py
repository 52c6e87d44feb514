"""Micro-batching throughput: 16 concurrent clients against one request at a time, in one run.

    .venv/bin/python benchmarks/serve_load.py                        # magic-mm-tiny, all three mixes
    .venv/bin/python benchmarks/serve_load.py --mix text --rounds 5  # search-box queries only
    .venv/bin/python benchmarks/serve_load.py --images ../shared/data/flickr8k-1k/images --mix image
    .venv/bin/python benchmarks/serve_load.py --db magic.lance        # the mixed load adds /v1/search
    .venv/bin/python benchmarks/serve_load.py --mix image --unsplit   # + image passes not split

Two servers on 127.0.0.1, each in a process of its own (as in production: two in one process
would each keep an OpenMP team and slow each other; docs/serving.md), load the same model:
"one at a time" (max_batch=1: the model sees one request per forward pass) and "micro-batched"
(--max-batch, --max-wait-ms, image passes split over --image-workers model threads).  --unsplit
adds a third, micro-batched with each image pass in one piece, to the same rounds.  All get the
same load: --clients threads, each sending its requests back to back.  Each distinct
request is first sent alone to each (unmeasured warm-up; the first server's answers are the
single-request answers).  Then --rounds rounds alternate the servers (one round: each
server gets --per-client requests from every client, in alternating order), because this
machine is shared and its speed drifts: the ratio of each round compares two passes run
back to back, and the table gives medians over rounds.

Mixes: "text" (16 distinct one-line queries), "image" (16 distinct images, one per
request; synthetic PNGs unless --images points at a folder of photos), "mixed" (texts,
images, image+text, dimensions, base64, candidate role, and search when --db is given).

Every answer is compared with the single-request answer: the count of answers differing by
more than 1e-4, and the largest difference of any vector component.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from magic_mm.serve.app import create_app, load_on_own_thread
from magic_mm.serve.batcher import BatchSettings
from magic_mm.serve.limits import ServeSettings
from magic_mm.serve.loadgen import (check_answers, deviation, file_data_url, image_mix, post, request_mix, run_load,
                                    text_mix)
from magic_mm.serve.runner import ServerThread

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
UNSPLIT = "micro-batched, one image pass"


QUIET_STEAL = 0.02  # a round counts as quiet when no pass in it lost more CPU than this


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) CPU ticks so far, from Linux's /proc/stat; None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """The share of CPU time the hypervisor gave to other machines in between. On a shared host
    this, not the code, moves a pass's throughput most (passes that lost 12–17 % ran 30–45 %
    slower than quiet ones in one run), so the summary also gives the rounds where none did."""
    if start is None or end is None or end[1] == start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


class ServerProcess:
    """One server in a child process of this script; the parent sends the load over HTTP."""

    def __init__(self, name: str, max_batch: int, image_workers: int, model: str, args: argparse.Namespace) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", f"{max_batch}:{image_workers}",
                   "--model", model, "--dtype", args.dtype, "--device", args.device, "--clients", str(args.clients),
                   "--max-wait-ms", str(args.max_wait_ms)] + (["--db", str(args.db)] if args.db else [])
        self.name = name
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self._read("READY "))
        self.url = self.info["url"]

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith(prefix):
                return line[len(prefix):]
        raise RuntimeError(f"server {self.name!r} exited ({self.proc.wait()})")

    def sizes(self) -> list[int]:
        """Inputs of every forward pass the server has run so far."""
        self.proc.stdin.write("stats\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self._read("STATS "))

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=60)


def serve_one(args: argparse.Namespace) -> None:
    """The child: load the model as ``magic-mm serve`` does, serve until stdin closes."""
    from magic_mm import MagicEmbedder
    from magic_mm.index.search import check_same_model
    from magic_mm.index.store import PageStore

    max_batch, image_workers = (int(x) for x in args.child.split(":"))
    store = PageStore.open(args.db) if args.db else None
    embedder = load_on_own_thread(lambda: MagicEmbedder.from_pretrained(args.model, dtype=args.dtype,
                                                                       device=args.device))
    if store is not None:
        check_same_model(store, embedder, args.model)
    app = create_app(embedder, args.model, store, ServeSettings(batch=BatchSettings(
        max_batch=max_batch, max_wait_ms=args.max_wait_ms, max_queue=4 * args.clients, image_workers=image_workers)))
    service = app.state.service
    with ServerThread(app) as server:
        print("READY " + json.dumps({"url": server.url, **embedder.placement, "image_workers": service.image_workers}),
              flush=True)
        for line in sys.stdin:
            if line.strip() == "stats":
                print("STATS " + json.dumps(service.batcher.stats.sizes), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=None, help="index for the search requests of the mixed load")
    parser.add_argument("--model", default=None, help="default: the index's model, else magic-mm-tiny")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has it), float32 or bfloat16")
    parser.add_argument("--device", default="auto", help="auto (the GPU when torch sees one), cpu, cuda or cuda:N")
    parser.add_argument("--mix", choices=("text", "image", "mixed", "all"), default="all")
    parser.add_argument("--images", type=Path, default=None, help="folder of photos for the image mix")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=4, help="requests per client per server per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=BatchSettings.max_batch)
    parser.add_argument("--max-wait-ms", type=float, default=BatchSettings.max_wait_ms)
    parser.add_argument("--image-workers", type=int, default=BatchSettings.image_workers,
                        help="model threads an image pass is split over on a CPU (1: one pass)")
    parser.add_argument("--unsplit", action="store_true",
                        help="add a third server, micro-batched with image passes not split, to the same rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # MAX_BATCH:IMAGE_WORKERS: be one server
    args = parser.parse_args()
    if args.child:
        serve_one(args)
        return

    store_model = None
    if args.db:
        from magic_mm.index.store import PageStore

        store_model = PageStore.open(args.db).stamp.model
    model = args.model or store_model or "magic-mm-tiny"
    photos = None
    if args.images:
        photos = [file_data_url(str(p)) for p in sorted(args.images.iterdir())
                  if p.suffix.lower() in PHOTO_SUFFIXES][:16]
    mixes = {"text": text_mix(), "image": image_mix(photos), "mixed": request_mix(with_search=args.db is not None)}
    if args.mix != "all":
        mixes = {args.mix: mixes[args.mix]}

    # server name → (max_batch, image_workers)
    variants = {"one at a time": (1, args.image_workers), "micro-batched": (args.max_batch, args.image_workers)}
    if args.unsplit:
        variants[UNSPLIT] = (args.max_batch, 1)
    # One process per server, as in production: each batcher's thread then holds its process's only
    # OpenMP team (two servers in one process would slow each other's every op; docs/serving.md).
    servers = {name: ServerProcess(name, size, workers, model, args) for name, (size, workers) in variants.items()}
    info = servers["micro-batched"].info
    print(f"{model} ({info['dtype']}, {info['device']}) · {args.clients} clients · {args.rounds} rounds × "
          f"{args.per_client} requests per client per server · max_batch {args.max_batch}, max_wait {args.max_wait_ms:g} ms, "
          f"image passes split over {info['image_workers']} · one process per server", flush=True)
    try:
        rows, quiet_notes = [], []
        for mix_name, mix in mixes.items():
            reference = [post(servers["one at a time"].url, path, body)[1] for path, body in mix]
            for path, body in mix:  # warm-up of the other servers
                for name in variants:
                    if name != "one at a time":
                        post(servers[name].url, path, body)
            passes: dict[str, list] = {name: [] for name in variants}
            quiet_rounds: list[bool] = []
            before = {name: len(server.sizes()) for name, server in servers.items()}
            for r in range(args.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                round_steal = []
                for name in order:
                    start = cpu_ticks()
                    result = run_load(servers[name].url, mix, args.clients, args.per_client)
                    passes[name].append(result)
                    stolen = steal_share(start, cpu_ticks())
                    round_steal.append(stolen)
                    print(f"  {mix_name} round {r + 1} {name}: {result.throughput:.2f} requests/s"
                          + ("" if stolen is None else f" (steal {100 * stolen:.0f} %)"), flush=True)
                quiet_rounds.append(all(x is not None and x <= QUIET_STEAL for x in round_steal))
            ratios = {name: [b.throughput / s.throughput for s, b in zip(passes["one at a time"], passes[name])]
                      for name in variants if name != "one at a time"}
            for name, values in ratios.items():
                quiet = [x for x, ok in zip(values, quiet_rounds) if ok]
                quiet_notes.append(f"{mix_name}: {name} / one at a time in the {len(quiet)} quiet rounds "
                                   f"(no pass over {100 * QUIET_STEAL:.0f} % steal): "
                                   + (f"{statistics.median(quiet):.2f}× (median; "
                                      + ", ".join(f"{x:.2f}" for x in quiet) + ")" if quiet else "none"))
            for name in variants:
                results = passes[name]
                sizes = servers[name].sizes()[before[name]:]
                latencies = [x for result in results for x in result.latencies]
                rows.append((mix_name, name, sum(r.requests for r in results), sum(len(r.errors) for r in results),
                             statistics.median(latencies) * 1000, statistics.median(r.throughput for r in results),
                             statistics.mean(sizes) if sizes else 0.0,
                             sum(len(check_answers(r, mix, reference)) for r in results),
                             max(deviation(r, mix, reference) for r in results),
                             statistics.median(ratios[name]) if name in ratios else None, ratios.get(name)))
    finally:
        for server in servers.values():
            server.close()

    print("\n| mix | server | requests | errors | median latency (ms) | requests/s (median of rounds) | "
          "inputs per forward pass | answers off by > 1e-4 | largest difference | throughput ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mix_name, name, n, errors, latency, rps, size, off, worst, ratio, _ in rows:
        print(f"| {mix_name} | {name} | {n} | {errors} | {latency:.0f} | {rps:.2f} | {size:.1f} | {off} | {worst:.1e} | "
              f"{'' if ratio is None else f'{ratio:.2f}×'} |")
    print()
    for mix_name, name, *_, ratio, ratios in rows:
        if ratio is not None:
            print(f"{mix_name}: {name} / one at a time = {ratio:.2f}× (median; rounds: "
                  + ", ".join(f"{x:.2f}" for x in ratios) + ")")
    for note in quiet_notes:
        print(note)


if __name__ == "__main__":
    main()
