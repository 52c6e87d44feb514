"""Issue 10's speed targets, measured against commit a8da1f2 in one interleaved run.

    git worktree add /tmp/magic-old a8da1f2          # the old code, once
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed_vs_baseline.py [--old /tmp/magic-old]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed_vs_baseline.py --index   # + `magic-mm index` of 1,000 photos

Each variant is a long-lived worker process (the old code runs with PYTHONPATH pointed at
the old checkout) that has loaded ``magic-mm-tiny`` once; the parent sends the same job to
every worker in turn, rotating who goes first each repetition, so load from other work on
the machine hits every variant alike.  Printed:

* candidates: images/s encoding N photos as candidates (batch 16, as ``index`` does),
  median over repetitions, and the ratio to the old code;
* vectors: mean and min cosine of every variant's candidate vectors to the old (float32)
  vectors of the same photos;
* query: p50 / p90 latency of a single text query (one caption per call);
* with ``--index``: wall time of ``magic-mm index IMAGES --db NEW_DB`` (the first step of
  ``make demo``: model load included, as a user waits for it), old and new alternating.

Both code versions load the same weights: ``--model``, by default the folder this checkout
ships as ``magic-mm-tiny`` (the old code's own ``magic-mm-tiny`` is an older training run, and
its vectors would differ for that reason alone).

Variants: ``old`` (a8da1f2, float32), ``new`` (defaults: dtype auto), ``new-fp32``
(``--dtype float32``: the layout/folding/threading gains alone), ``new-autocast``
(float32 weights under ``torch.autocast(bfloat16)``, the alternative to bf16 weights),
``new-nothreads`` (defaults, images decoded inline: what the decode threads buy) and
``new-unmerged`` (defaults, but LoRA kept apart from the base weights, as ``trainable=True``
loads it: what merging buys where ``auto`` means float32) and ``new-oneworker`` (defaults, but
every batch on the calling thread: what the two model workers buy). ``--index-variants`` takes
``old``, ``new`` and ``new-oneworker`` (``index --image-workers 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "flickr8k-1k"
VARIANTS = ("old", "new", "new-fp32", "new-autocast", "new-nothreads", "new-unmerged", "new-oneworker")
INDEX_VARIANTS = ("old", "new", "new-oneworker")


# -- worker ------------------------------------------------------------------------------
def worker(variant: str, model_folder: str) -> None:
    import contextlib

    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import magic_mm
    from magic_mm import MagicEmbedder

    kwargs = {}
    if variant in ("new-fp32", "new-autocast"):
        kwargs["dtype"] = "float32"
    if variant == "new-unmerged":
        kwargs["trainable"] = True
    model = MagicEmbedder.from_pretrained(model_folder, **kwargs)
    if variant == "new-nothreads":
        model.decode_threads = 0
    if variant == "new-oneworker":
        model.model_workers = 1
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if variant == "new-autocast" \
        else contextlib.nullcontext
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print("READY " + json.dumps({"code": str(Path(magic_mm.__file__).parent), "dtype": dtype,
                                 "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        if job["op"] == "candidates":
            images = [Path(p) for p in job["images"]]
            with context():
                start = time.perf_counter()
                vectors = model.encode(images, role="candidate", batch_size=job["batch"])
                seconds = time.perf_counter() - start
            if job.get("save"):
                np.save(job["save"], vectors)
            result = {"seconds": seconds}
        else:  # one text query per call
            ms = []
            with context():
                for text in job["texts"]:
                    start = time.perf_counter()
                    model.encode([text], role="query")
                    ms.append((time.perf_counter() - start) * 1000.0)
            result = {"ms": ms}
        print("RESULT " + json.dumps(result), flush=True)


class Worker:
    def __init__(self, variant: str, old_root: Path, model_folder: Path) -> None:
        root = old_root if variant == "old" else REPO
        env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("MAGIC_MM_DTYPE", None)
        self.variant = variant
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", variant,
                                      "--model", str(model_folder)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(root))
        self.info = json.loads(self._read("READY "))

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith(prefix):
                return line[len(prefix):]
        raise RuntimeError(f"worker {self.variant} exited ({self.proc.wait()})")

    def run(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self._read("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait()


def rotate(items: list, n: int) -> list:
    return items[n % len(items):] + items[: n % len(items)]


def encode_bench(args: argparse.Namespace) -> dict:
    import numpy as np

    images = sorted((DATA / "images").glob("*.jpg"))[args.offset : args.offset + args.images]
    captions = [line.split(",", 1)[1].strip().strip('"')
                for line in (DATA / "captions.csv").read_text().splitlines()[1:]][: args.queries]
    workers = [Worker(v, args.old, args.model) for v in args.variants]
    out = tempfile.mkdtemp(prefix="speed-vs-baseline-")
    try:
        for w in workers:  # warm-up (first-call allocations, oneDNN kernel creation)
            w.run({"op": "candidates", "images": [str(p) for p in images[:4]], "batch": args.batch})
            w.run({"op": "query", "texts": captions[:3]})
        seconds = {w.variant: [] for w in workers}
        query_ms = {w.variant: [] for w in workers}
        for rep in range(args.reps):
            for w in rotate(workers, rep):
                save = f"{out}/{w.variant}.npy" if rep == 0 else None
                res = w.run({"op": "candidates", "images": [str(p) for p in images], "batch": args.batch,
                             "save": save})
                seconds[w.variant].append(res["seconds"])
            for w in rotate(workers, rep):
                query_ms[w.variant] += w.run({"op": "query", "texts": captions})["ms"]
    finally:
        for w in workers:
            w.close()
    vectors = {v: np.load(f"{out}/{v}.npy") for v in seconds}
    rows = {}
    for w in workers:
        v = w.variant
        rate = [len(images) / s for s in seconds[v]]
        cos = (vectors[v] * vectors["old"]).sum(1) if "old" in vectors else None
        rows[v] = {"dtype": w.info["dtype"], "images_per_s": statistics.median(rate), "images_per_s_all": rate,
                   "query_p50_ms": float(np.percentile(query_ms[v], 50)),
                   "query_p90_ms": float(np.percentile(query_ms[v], 90)),
                   "cos_mean": None if cos is None else float(cos.mean()),
                   "cos_min": None if cos is None else float(cos.min())}
    return {"images": len(images), "batch": args.batch, "reps": args.reps, "queries_per_rep": len(captions),
            "code": {w.variant: w.info["code"] for w in workers}, "rows": rows}


def index_bench(args: argparse.Namespace) -> dict:
    """Wall time of ``magic-mm index IMAGES --db FRESH`` for each index variant, alternating."""
    times: dict[str, list[float]] = {v: [] for v in args.index_variants}
    for rep in range(args.index_reps):
        for variant in rotate(list(args.index_variants), rep):
            root = args.old if variant == "old" else REPO
            env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            env.pop("MAGIC_MM_DTYPE", None)
            with tempfile.TemporaryDirectory(prefix=f"index-{variant}-") as tmp:
                cmd = [sys.executable, "-m", "magic_mm.cli", "index", str(DATA / "images"), "--db",
                       f"{tmp}/x.lance", "--model", str(args.model), "--quiet", "--json"]
                cmd += ["--limit", str(args.index_limit)] if args.index_limit else []
                cmd += ["--image-workers", "1"] if variant == "new-oneworker" else []
                start = time.perf_counter()
                proc = subprocess.run(cmd, env=env, cwd=str(root), capture_output=True, text=True)
                elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"{variant} index failed:\n{proc.stderr[-2000:]}")
            summary = json.loads(proc.stdout)
            times[variant].append(elapsed)
            print(f"  index {variant}: {elapsed:.1f} s ({summary['pages_embedded']} photos)", flush=True)
    return {"reps": args.index_reps, "limit": args.index_limit, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--old", type=Path, default=Path("/tmp/magic-old"), help="checkout of a8da1f2")
    parser.add_argument("--model", type=Path, default=REPO / "magic_mm" / "default_model",
                        help="model folder both code versions load (default: this checkout's magic-mm-tiny)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--offset", type=int, default=0, help="skip this many photos (sorted by name)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--queries", type=int, default=10, help="single-text queries per variant per rep")
    parser.add_argument("--index", action="store_true", help="also time `magic-mm index` of the photos")
    parser.add_argument("--index-only", action="store_true")
    parser.add_argument("--index-reps", type=int, default=1)
    parser.add_argument("--index-variants", default="old,new", help=f"from {', '.join(INDEX_VARIANTS)}")
    parser.add_argument("--index-limit", type=int, default=0, help="index only this many photos (0: all)")
    parser.add_argument("--save", type=Path, help="write the JSON result here")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, str(args.model))
        return
    if not (args.old / "magic_mm").is_dir():
        sys.exit(f"{args.old}: no old checkout; run `git worktree add {args.old} a8da1f2`")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "old" not in args.variants:
        args.variants.insert(0, "old")
    args.index_variants = [v.strip() for v in args.index_variants.split(",") if v.strip()]
    if unknown := set(args.variants) - set(VARIANTS) | set(args.index_variants) - set(INDEX_VARIANTS):
        sys.exit(f"unknown variant(s): {', '.join(sorted(unknown))}")
    if "old" not in args.index_variants:
        args.index_variants.insert(0, "old")
    result: dict = {"load_average_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    if not args.index_only:
        res = result["encode"] = encode_bench(args)
        base = res["rows"]["old"]
        print(f"\ncandidates: {res['images']} photos, batch {res['batch']}, {res['reps']} interleaved reps; "
              f"query: {res['queries_per_rep']} single-text calls per rep")
        print(f"{'variant':15} {'dtype':9} {'images/s':>9} {'× old':>7} {'cos mean':>9} {'cos min':>8} "
              f"{'query p50 ms':>13} {'p90':>7} {'p50 × old':>10}")
        for v, r in res["rows"].items():
            print(f"{v:15} {r['dtype']:9} {r['images_per_s']:9.2f} {r['images_per_s'] / base['images_per_s']:7.2f} "
                  f"{r['cos_mean']:9.5f} {r['cos_min']:8.5f} {r['query_p50_ms']:13.1f} {r['query_p90_ms']:7.1f} "
                  f"{r['query_p50_ms'] / base['query_p50_ms']:10.2f}")
    if args.index or args.index_only:
        print("\nmagic-mm index (model load included):", flush=True)
        res = result["index"] = index_bench(args)
        old = statistics.median(res["seconds"]["old"])
        for variant in args.index_variants[1:]:
            new = statistics.median(res["seconds"][variant])
            print(f"old {old:.1f} s, {variant} {new:.1f} s: {old / new:.2f}× faster")
    result["load_average_at_end"] = os.getloadavg()
    print(f"\nload average at start {result['load_average_at_start']}, at end {result['load_average_at_end']}")
    if args.save:
        args.save.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
