"""ANN (IVF-PQ, HNSW) against exact search in LanceDB: recall@10 and queries per second.

    .venv/bin/python benchmarks/ann.py --sizes 10000 1000000 --dim 128

Vectors and queries are independent Gaussian random unit vectors (no cluster structure:
the hardest case for an ANN index).  Ground truth is LanceDB's exact (brute-force) search.
The index parameters are the ones `magic-mm index --ann` uses (magic_mm.index.store.build_ann_index).
QPS is one query at a time, after one warm-up query, on this machine's CPUs.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from magic_mm.index.store import build_ann_index


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    out = rng.standard_normal((n, dim), dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def make_table(folder: Path, n: int, dim: int, seed: int):
    import lancedb

    rng = np.random.default_rng(seed)
    db = lancedb.connect(str(folder))
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float32(), dim))])
    table = db.create_table("vectors", schema=schema)
    for start in range(0, n, 100_000):  # in chunks, to keep memory flat
        count = min(100_000, n - start)
        vectors = unit_vectors(rng, count, dim)
        table.add(pa.table({"id": pa.array(np.arange(start, start + count)),
                            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)},
                           schema=schema))
    return table


def run_queries(table, queries: np.ndarray, k: int, mode: str, nprobes: int, refine: int | None,
                ef: int = 0) -> tuple[list, float]:
    def one(q: np.ndarray) -> list[int]:
        query = table.search(q).distance_type("cosine").limit(k).select(["id", "_distance"])
        if mode == "exact":
            query = query.bypass_vector_index()
        else:
            query = query.nprobes(nprobes)
            if refine:
                query = query.refine_factor(refine)
            if mode == "hnsw":
                query = query.ef(ef)
        return query.to_arrow()["id"].to_pylist()

    one(queries[0])  # warm-up (opens files, loads the index)
    started = time.perf_counter()
    ids = [one(q) for q in queries]
    return ids, len(queries) / (time.perf_counter() - started)


def recall(found: list[list[int]], truth: list[list[int]], k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobes", type=int, nargs="+", default=[20, 100], help="IVF partitions searched")
    parser.add_argument("--refine", type=int, default=10, help="IVF-PQ refine factor (re-scores k×refine exactly)")
    parser.add_argument("--ef", type=int, default=200, help="HNSW search breadth")
    parser.add_argument("--kinds", nargs="+", default=["ivf-pq", "hnsw"])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    for n in args.sizes:
        folder = Path(tempfile.mkdtemp(prefix="magic-mm-ann-", dir=args.workdir))
        try:
            started = time.perf_counter()
            table = make_table(folder, n, args.dim, seed=n)
            print(f"[{n:,} × {args.dim}] table written in {time.perf_counter() - started:.1f} s", flush=True)
            queries = unit_vectors(np.random.default_rng(1), args.queries, args.dim)
            truth, exact_qps = run_queries(table, queries, args.k, "exact", 0, None)
            rows.append((n, "exact (brute force)", "-", 1.0, exact_qps))
            print(f"  exact: {exact_qps:.1f} QPS", flush=True)
            for kind in args.kinds:
                started = time.perf_counter()
                build_ann_index(table, kind, n, args.dim)
                build_s = time.perf_counter() - started
                for nprobes in args.nprobes:
                    found, qps = run_queries(table, queries, args.k, kind, nprobes,
                                             args.refine if kind == "ivf-pq" else None, args.ef)
                    rows.append((n, f"{kind}, nprobes {nprobes}", f"{build_s:.1f}", recall(found, truth, args.k), qps))
                    print(f"  {rows[-1][1]}: built in {build_s:.1f} s, recall@{args.k} {rows[-1][3]:.3f}, "
                          f"{qps:.1f} QPS", flush=True)
                table.drop_index("vector_idx")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"\nANN vs exact search · {args.queries} random queries · dim {args.dim} · k={args.k} · "
          f"IVF-PQ refine ×{args.refine} · HNSW ef {args.ef}\n")
    print(f"| vectors | search | index build (s) | recall@{args.k} | QPS | QPS vs exact |")
    print("|---:|---|---:|---:|---:|---:|")
    exact = {n: qps for n, kind, _, _, qps in rows if kind.startswith("exact")}
    for n, kind, build, rec, qps in rows:
        print(f"| {n:,} | {kind} | {build} | {rec:.3f} | {qps:.1f} | {qps / exact[n]:.1f}× |")


if __name__ == "__main__":
    main()
