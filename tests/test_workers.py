"""Model workers on a CPU (``magic_mm.model.workers``): batches side by side, each on its share of
torch's intra-op threads, with the vectors of one batch at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import REPO, make_image
from magic_mm.index.indexer import index_paths
from magic_mm.index.store import ModelStamp, PageStore
from magic_mm.model.workers import map_in_order, model_worker_pool

MODEL = "tiny-random-composed"


def test_model_workers_leave_later_threads_on_all_intra_op_threads(two_threads):
    """torch.set_num_threads in a worker also sets what every later thread starts with; the pool
    must put that back, or a thread started after it would run on one thread."""
    pool = model_worker_pool(torch.device("cpu"), 2)
    try:
        assert {pool.submit(torch.get_num_threads).result() for _ in range(4)} == {1}
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2] and torch.get_num_threads() == 2
    finally:
        pool.shutdown()


def test_no_model_workers_where_splitting_cannot_help(two_threads):
    assert model_worker_pool(torch.device("cpu"), 1) is None  # asked for one
    assert model_worker_pool(torch.device("meta"), 2) is None  # not a CPU (a GPU runs one stream)
    assert model_worker_pool(torch.device("cpu"), 3) is None  # fewer intra-op threads than workers


def test_map_in_order_keeps_the_order_bounds_the_work_in_flight_and_raises_at_its_turn(two_threads):
    running, most, made = 0, 0, []
    lock = threading.Lock()

    def work(job: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05 if job % 2 == 0 else 0.01)  # later jobs finish first
        with lock:
            running -= 1
        if job == 5:
            raise ValueError("job 5 failed")
        return job * 10

    def jobs():
        for job in range(8):
            made.append(job)
            yield job

    with model_worker_pool(torch.device("cpu"), 2) or pytest.skip("needs 2 intra-op threads") as pool:
        results = map_in_order(work, jobs(), pool, workers=2)  # 3 in flight
        assert [next(results) for _ in range(5)] == [(j, j * 10) for j in range(5)]
        assert len(made) <= 5 + 3  # jobs are made as room frees up, not all at once
        with pytest.raises(ValueError, match="job 5 failed"):
            next(results)
    assert most <= 2  # never more at once than the pool's workers
    assert list(map_in_order(lambda j: -j, iter(range(3)), None, 1)) == [(0, 0), (1, -1), (2, -2)]


def test_jobs_on_model_workers_run_under_the_callers_autocast(two_threads):
    def modes(_: int) -> tuple[bool, torch.dtype]:
        return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    with model_worker_pool(torch.device("cpu"), 2) or pytest.skip("needs 2 intra-op threads") as pool:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert {r for _, r in map_in_order(modes, range(4), pool, 2)} == {(True, torch.bfloat16)}
        assert {r[0] for _, r in map_in_order(modes, range(4), pool, 2)} == {False}


def test_encode_on_model_workers_gives_the_vectors_of_one_batch_at_a_time(tiny_composed, two_threads):
    images = [make_image(60 + 7 * n, 40, seed=n) for n in range(7)]
    texts = [f"a photo of thing number {n}" for n in range(5)]
    seen: set[str] = set()
    embed = tiny_composed.embed_prepared

    def recording(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return embed(*args, **kwargs)

    tiny_composed.embed_prepared = recording
    try:
        for inputs, role in ((images, "candidate"), (texts, "query"), (list(zip(images, texts)), "query")):
            alone = tiny_composed.encode(inputs, role=role, batch_size=2, workers=1)
            assert seen == {threading.current_thread().name}
            seen.clear()
            side_by_side = tiny_composed.encode(inputs, role=role, batch_size=2)  # default: 2 workers
            assert seen and all(name.startswith("magic-mm-model") for name in seen)
            seen.clear()
            np.testing.assert_allclose(side_by_side, alone, atol=1e-5, rtol=0)
        tiny_composed.encode(images[:2], role="candidate", batch_size=2)  # one batch: run here, no pool
        assert seen == {threading.current_thread().name}
    finally:
        del tiny_composed.embed_prepared
    with pytest.raises(Exception, match="workers must be >= 1, got 0"):
        tiny_composed.encode(texts, workers=0)


def test_a_bad_image_among_batches_on_model_workers_is_named_and_nothing_hangs(tiny_composed, two_threads, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    inputs = [make_image(50, 40, seed=n) for n in range(5)] + [bad] + [make_image(50, 40, seed=9)]
    with pytest.raises(Exception, match="broken.jpg"):
        tiny_composed.encode(inputs, role="candidate", batch_size=2)


def test_index_on_model_workers_builds_the_index_of_one_worker(tiny_composed, two_threads, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for n in range(9):
        make_image(50 + n, 40, seed=n).save(docs / f"p{n}.png")
    (docs / "broken.jpg").write_bytes(b"not a jpeg")
    stamp = ModelStamp.of(tiny_composed, MODEL)
    tables = {}
    for workers in (1, 2):
        store = PageStore.open_or_create(tmp_path / f"w{workers}.lance", stamp)
        summary = index_paths(tiny_composed, store, [docs], batch_size=2, workers=workers)
        assert len(summary.added) == 9 and [f["path"] for f in summary.failed] == [str(docs / "broken.jpg")]
        table = store.table.to_arrow().sort_by("path")
        tables[workers] = (table["path"].to_pylist(), np.stack(table["vector"].to_numpy(zero_copy_only=False)))
    assert tables[1][0] == tables[2][0]
    np.testing.assert_allclose(tables[2][1], tables[1][1], atol=1e-5, rtol=0)


def test_index_image_workers_option_as_a_user_runs_it(tmp_path):
    """The installed script: --image-workers 1 and 2 index the same rows; bad values are usage errors."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for n in range(5):
        make_image(44, 36, seed=n).save(docs / f"p{n}.png")
    script = os.path.join(os.path.dirname(sys.executable), "magic-mm")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def index(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([script, "index", str(docs), "--model", MODEL, "--batch-size", "2", *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    for workers in ("1", "2"):
        done = index("--db", str(tmp_path / f"w{workers}.lance"), "--image-workers", workers, "--json")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["counts"]["added"] == 5 and summary["rows"] == 5
    zero = index("--db", str(tmp_path / "z.lance"), "--image-workers", "0")
    assert zero.returncode == 2 and "--image-workers" in zero.stderr
    ray = index("--db", str(tmp_path / "r.lance"), "--image-workers", "2", "--engine", "ray")
    assert ray.returncode == 2 and "--image-workers goes with --engine local" in ray.stderr
