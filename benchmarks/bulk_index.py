"""Bulk indexing: the local engine (one process) against the Ray engine with 1 and 2 workers.

All runs happen in this one process, on the same photos, in one sitting, in rounds (each
round runs every engine once, so that a change in a shared machine's load falls on all alike):

* **local** — ``index_paths`` with the model already loaded (what ``magic-mm index`` does after
  its model load), with torch's default threads (one per core);
* **ray, N workers** — per repeat: start a local Ray (timed: *Ray start*), run
  ``index_paths_ray`` into a fresh index (timed: *job*), run it again, when every file is
  skipped (timed: *fixed cost*: launching the dataset, starting the actors, loading a model
  in each, hashing), then shut Ray down.  *Rows/s (steady)* is
  rows / (job - fixed cost): the rate once the workers are up.

Workers split the machine's cores (1 worker gets all of them, 2 get half each), so the
local engine and Ray use the same number of threads.  It also times the driver's commits
(``PageStore.replace`` of random vectors), the ceiling on rows/s however many workers there
are.  Prints a table of medians and the numbers docs/bulk.md derives its estimates from.

    .venv/bin/python benchmarks/bulk_index.py                      # magic-mm-tiny, 120 photos, 3 repeats
    .venv/bin/python benchmarks/bulk_index.py --workers 1 4 --gpus-per-worker 1   # on a 4-GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "flickr8k-1k" / "images"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def resources_for(workers: int, gpus_per_worker: float, cores: int):
    """Workers split the cores (CPU workers), so every engine runs on the same number of threads."""
    from magic_mm.bulk import WorkerResources

    cpus = max(1, cores // workers) if gpus_per_worker == 0 else 1
    return WorkerResources(workers=workers, gpus=gpus_per_worker, cpus=cpus)


def commit_rate(dim: int, batch: int, folder: Path, rounds: int = 20) -> float:
    """Rows per second the driver commits (delete + atomic add per batch), vectors ready-made."""
    from magic_mm.index.store import ModelStamp, PageStore

    store = PageStore.open_or_create(folder / f"commit-{batch}.lance",
                                     ModelStamp(model="bench", compression="none", dim=dim, fingerprint="0" * 16))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for r in range(rounds):
        paths = [f"/bench/{r}/{i}.jpg" for i in range(batch)]
        rows = [{"path": p, "kind": "image", "page": 1, "pages": 1, "hash": "h"} for p in paths]
        store.replace(paths, rows, rng.standard_normal((batch, dim)).astype(np.float32))
    return rounds * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="magic-mm-tiny")
    parser.add_argument("--images", type=int, default=120, help="Photos from flickr8k-1k to index.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, help="Also write the numbers as JSON.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from magic_mm import MagicEmbedder
    import torch

    from magic_mm.bulk import resolve_worker_dtype, start_ray
    from magic_mm.index.indexer import index_paths
    from magic_mm.index.ray_engine import index_paths_ray
    from magic_mm.index.store import ModelStamp, PageStore

    import ray

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    photos = work / "photos"
    photos.mkdir()
    for source in sorted(DATA.glob("*.jpg"))[: args.images]:
        shutil.copy(source, photos / source.name)
    rows = len(list(photos.iterdir()))
    embedder = MagicEmbedder.from_pretrained(args.model, dtype=args.dtype)
    stamp = ModelStamp.of(embedder, args.model)
    results: list[dict] = []

    # Repeats are the outer loop: each round runs every engine once, so a change in the machine's
    # load (it is shared) falls on all of them alike.
    configs = [None, *args.workers]  # None: the local engine
    times: dict[object, dict[str, list[float]]] = {c: {"start": [], "job": [], "fixed": []} for c in configs}
    for r in range(args.repeats):
        for workers in configs:
            measured = times[workers]
            if workers is None:
                store = PageStore.open_or_create(work / f"local-{r}.lance", stamp)
                seconds, summary = timed(index_paths, embedder, store, [photos], batch_size=args.batch_size)
                assert summary.rows == rows, summary.counts()
                measured["job"].append(seconds)
                continue
            resources = resources_for(workers, args.gpus_per_worker, cores)
            dtype = resolve_worker_dtype(args.dtype, resources)
            seconds, _ = timed(start_ray, None, workers, resources.cpus)
            measured["start"].append(seconds)
            try:
                store = PageStore.open_or_create(work / f"ray-{workers}-{r}.lance", stamp)
                seconds, summary = timed(index_paths_ray, args.model, store, [photos], resources, dtype,
                                         batch_size=args.batch_size)
                assert summary.rows == rows and summary.pages_embedded == rows, summary.counts()
                measured["job"].append(seconds)
                seconds, summary = timed(index_paths_ray, args.model, store, [photos], resources, dtype,
                                         batch_size=args.batch_size)
                assert len(summary.skipped) == rows, summary.counts()
                measured["fixed"].append(seconds)
            finally:
                ray.shutdown()
            print(f"round {r + 1}: ray {workers} worker(s) job {measured['job'][-1]:.1f} s", flush=True)
        print(f"round {r + 1}: local job {times[None]['job'][-1]:.1f} s", flush=True)

    for workers in configs:
        measured = times[workers]
        job = statistics.median(measured["job"])
        if workers is None:
            results.append({"engine": "local (1 process)", "workers": 1, "threads_per_worker": torch.get_num_threads(),
                            "ray_start_s": None, "job_s": job, "fixed_s": None, "rows_per_s": rows / job,
                            "steady_rows_per_s": rows / job, "job_runs_s": measured["job"]})
            continue
        fixed_s = statistics.median(measured["fixed"])
        results.append({"engine": f"ray, {workers} worker(s)", "workers": workers,
                        "threads_per_worker": int(resources_for(workers, args.gpus_per_worker, cores).cpus),
                        "ray_start_s": statistics.median(measured["start"]), "job_s": job, "fixed_s": fixed_s,
                        "rows_per_s": rows / job, "steady_rows_per_s": rows / max(job - fixed_s, 1e-9),
                        "job_runs_s": measured["job"], "fixed_runs_s": measured["fixed"],
                        "start_runs_s": measured["start"]})

    commits = {batch: commit_rate(embedder.embedding_dim, batch, work) for batch in (16, 256)}
    shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.model} ({args.dtype}), {rows} photos, batch {args.batch_size}, {cores} CPU cores, "
          f"medians of {args.repeats} runs\n")
    print("| engine | threads/worker | Ray start (s) | job (s) | fixed cost per run (s) | rows/s | "
          "rows/s (steady) | vs local |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    local_rate = results[0]["rows_per_s"]
    for row in results:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {row['engine']} | {row['threads_per_worker']} | {fmt(row['ray_start_s'])} | {row['job_s']:.1f} | "
              f"{fmt(row['fixed_s'])} | {row['rows_per_s']:.2f} | {row['steady_rows_per_s']:.2f} | "
              f"{row['rows_per_s'] / local_rate:.2f}× |")
    print("\ndriver commit ceiling (delete + atomic add per batch): "
          + ", ".join(f"{rate:,.0f} rows/s at batch {batch}" for batch, rate in commits.items()))
    one = next((r for r in results if r["workers"] == 1 and r["ray_start_s"] is not None), None)
    if one is not None:
        print(f"single Ray worker: {one['steady_rows_per_s']:.2f} rows/s steady; per run: Ray start "
              f"{one['ray_start_s']:.1f} s + fixed cost {one['fixed_s']:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "rows": rows, "cores": cores, "runs": results,
                                        "commit_rows_per_s": commits}, indent=2))


if __name__ == "__main__":
    main()
