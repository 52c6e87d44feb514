"""Streaming a training sub-dataset keeps memory flat: 10k rows vs 1M rows, parquet and JSONL.

Generates sub-datasets in the MMEB-train layout in a temporary folder (text rows shaped like
MMEB-train's, with an image path every other row and a negative every third), then, for each
file in its own fresh process, opens it and draws ``--steps`` mixed batches through
``MixtureSampler`` + ``SubDatasetReader.rows`` (the trainer's path), and one full streamed pass
(what mining and the vision cache do).  Each child resets the kernel's peak-RSS mark after its
imports and reports the peak (``VmHWM``) reached by that work, and rows/s; the table compares them.

    .venv/bin/python benchmarks/stream_memory.py            # 10k and 1M rows, ~1-2 min here
    .venv/bin/python benchmarks/stream_memory.py --rows 10000 100000 --steps 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from magic_mm.data.train_layout import (  # noqa: E402
    MixtureSampler,
    SubDataset,
    open_subdataset,
    write_rows,
)


def records(n: int):  # noqa: ANN201
    for i in range(n):
        yield {"qry": f"<|image_1|>\nRepresent the given image with the following question: what is in photo {i}?",
               "qry_image_path": "photo.png" if i % 2 == 0 else "",
               "pos_text": f"the answer for row {i}, a sentence of about the length of a caption",
               "pos_image_path": "",
               "neg_text": f"a wrong answer {i}" if i % 3 == 0 else ""}


def status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start the peak-RSS mark afresh (Linux: ``5`` into ``clear_refs``), so imports do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(path: Path, steps: int, batch_size: int) -> dict:
    """Run in a fresh process: open, draw ``steps`` batches, then stream every row once."""
    import gc

    import pyarrow.parquet  # noqa: F401  (loaded before the mark, as a trainer has it loaded)

    gc.collect()
    reset_peak()
    baseline = status_mb("VmRSS")
    start = time.perf_counter()
    reader = open_subdataset(SubDataset(str(path), image_root=str(path.parent)))
    opened = time.perf_counter() - start
    # a two-sub-dataset mixture over the same file (weights 1:3), as the trainers draw it
    sampler = MixtureSampler([reader.blocks, reader.blocks], [1.0, 3.0], batch_size, seed=0)
    start = time.perf_counter()
    drawn = 0
    for step in range(steps):
        _, positions = sampler.batch(step)
        drawn += len(reader.rows(positions))
    sampled = time.perf_counter() - start
    start = time.perf_counter()
    streamed = sum(1 for _ in open_subdataset(SubDataset(str(path), image_root=str(path.parent))))
    passed = time.perf_counter() - start  # a fresh reader: nothing cached
    assert streamed == len(reader)
    return {"rows": len(reader), "format": path.suffix[1:], "open_s": round(opened, 2),
            "batch_rows_per_s": round(drawn / sampled), "pass_rows_per_s": round(streamed / passed),
            "peak_rss_mb": round(status_mb("VmHWM"), 1), "start_rss_mb": round(baseline, 1),
            "file_mb": round(path.stat().st_size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=300, help="batches drawn per file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "STEPS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), int(args.child[1]), int(args.child[2]))))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        Image.new("RGB", (8, 8)).save(Path(tmp) / "photo.png")
        for n in args.rows:
            for suffix in (".parquet", ".jsonl"):
                path = write_rows(records(n), Path(tmp) / f"sub{n}{suffix}")
                child = subprocess.run([sys.executable, __file__, "--child", str(path), str(args.steps),
                                        str(args.batch_size)], capture_output=True, text=True, check=True)
                results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{args.steps} batches of {args.batch_size} (a 1:3 mixture over the file), then one full pass; "
          "each file in a fresh process")
    print(f"{'format':8} {'rows':>10} {'file MB':>8} {'open s':>7} {'RSS at start':>13} {'peak RSS MB':>12} "
          f"{'batch rows/s':>13} {'pass rows/s':>12}")
    for r in results:
        print(f"{r['format']:8} {r['rows']:>10,} {r['file_mb']:>8} {r['open_s']:>7} {r['start_rss_mb']:>13} "
              f"{r['peak_rss_mb']:>12} {r['batch_rows_per_s']:>13,} {r['pass_rows_per_s']:>12,}")
    for fmt in ("parquet", "jsonl"):
        sizes = sorted((r for r in results if r["format"] == fmt), key=lambda r: r["rows"])
        if len(sizes) > 1:
            small, big = sizes[0], sizes[-1]
            print(f"{fmt}: {big['rows'] // small['rows']}x the rows, peak RSS x{big['peak_rss_mb'] / small['peak_rss_mb']:.2f} "
                  f"({big['peak_rss_mb'] - small['peak_rss_mb']:+.1f} MB)")


if __name__ == "__main__":
    main()
