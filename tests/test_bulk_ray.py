"""``magic-mm index --engine ray`` and ``magic_mm.bulk.embed`` on a local Ray with 2 workers.

What is checked: the Ray engine's vectors equal ``encode``'s and its index is the local
engine's (a local run after it skips everything); the worker actors SIGKILLed mid-job and a
driver SIGKILLed mid-job lose no page and duplicate none; ``bulk.embed`` equals ``encode``;
without Ray, ``--engine ray`` says how to install it.  The model is a tiny random one: none
of this depends on trained weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_index import expected_pages, make_pdf, rows_per_page

from magic_mm.errors import UserError
from magic_mm.index.files import content_hash, find_documents, render_pdf
from magic_mm.index.indexer import index_paths
from magic_mm.index.store import ModelStamp, PageStore

MODEL = "tiny-random-composed"
PHOTOS = 60
PDF_PAGES = 3
PAGES = PHOTOS + PDF_PAGES
WORKERS = 2
SCRIPT = REPO / ".venv" / "bin" / "magic-mm"
ACTOR_TITLE = "ray::MapWorker(MapBatches(PageWorker))"  # how Ray titles an embedding actor's process


@pytest.fixture(scope="module")
def photo_folder(flickr_dir, tmp_path_factory) -> Path:
    """60 shared photos plus a 3-page PDF, copied so that tests may change them."""
    folder = tmp_path_factory.mktemp("bulk") / "docs"
    folder.mkdir()
    for source in sorted((flickr_dir / "images").glob("*.jpg"))[:PHOTOS]:
        shutil.copy(source, folder / source.name)
    make_pdf(folder / "report.pdf", PDF_PAGES, seed=3)
    return folder


@pytest.fixture
def docs(photo_folder, tmp_path) -> Path:
    """A private copy of the photo folder (for tests that change files)."""
    copy = tmp_path / "docs"
    shutil.copytree(photo_folder, copy)
    return copy


def cli(*args: object, timeout: int = 900) -> subprocess.CompletedProcess:
    """The installed ``magic-mm`` script in a subprocess (its own local Ray)."""
    return subprocess.run([str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def ray_index_args(docs: Path, db: Path, *extra: object) -> list[object]:
    return ["index", docs, "--db", db, "--model", MODEL, "--engine", "ray", "--workers", WORKERS, *extra]


def stored_vectors(db: Path) -> dict[tuple[str, int], np.ndarray]:
    table = PageStore.open(db).table.to_arrow()
    return {(path, page): np.asarray(vector, np.float32) for path, page, vector in
            zip(table["path"].to_pylist(), table["page"].to_pylist(), table["vector"].to_pylist())}


def assert_vectors_equal_encode(db: Path, docs: Path, embedder) -> None:
    """Every row's vector is ``encode``'s for that page (candidate role), within 1e-5."""
    stored = stored_vectors(db)
    documents = find_documents([docs])
    photos = [d.path for d in documents if d.kind == "image"]
    pdfs = [d.path for d in documents if d.kind == "pdf"]
    keys = [(str(p), 1) for p in photos]
    inputs: list[object] = list(photos)
    for pdf in pdfs:
        pages = render_pdf(pdf)
        keys += [(str(pdf), n) for n in range(1, len(pages) + 1)]
        inputs += pages
    expected = embedder.encode(inputs, role="candidate")
    assert sorted(stored) == sorted(keys)
    got = np.stack([stored[key] for key in keys])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_ray_index_equals_encode_and_the_local_engine_skips_it(photo_folder, tiny_composed, tmp_path):
    db = tmp_path / "ray.lance"
    done = cli(*ray_index_args(photo_folder, db, "--json"))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["engine"] == "ray" and summary["failed"] == []
    assert summary["counts"]["added"] == PHOTOS + 1 and summary["pages_embedded"] == summary["rows"] == PAGES
    assert summary["added"] == sorted(summary["added"])  # the same order as the local engine reports
    counts = rows_per_page(db)
    assert counts == expected_pages(photo_folder) and max(counts.values()) == 1
    assert_vectors_equal_encode(db, photo_folder, tiny_composed)
    # The same index, as far as the local engine is concerned: nothing left to do.
    again = index_paths(tiny_composed, PageStore.open(db), [photo_folder])
    assert len(again.skipped) == PHOTOS + 1 and again.pages_embedded == 0 and again.failed == []
    assert PageStore.open(db).stamp == ModelStamp.of(tiny_composed, MODEL)


def table_version(db: Path) -> int:
    try:
        return PageStore.open(db).table.version
    except UserError:
        return 0


def test_driver_killed_mid_job_then_rerun_loses_and_duplicates_nothing(docs, tiny_composed, tmp_path):
    """SIGKILL the `magic-mm index --engine ray` process mid-job; change and delete a file; run again."""
    db = tmp_path / "killed.lance"
    process = subprocess.Popen([str(SCRIPT), *map(str, ray_index_args(docs, db, "--batch-size", 2, "--quiet"))],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        # The table's creation is commit 1; each batch of documents is a delete and an add.
        while table_version(db) < 4:
            assert process.poll() is None, f"indexing ended before it could be killed: {process.stderr.read()}"
            assert time.monotonic() < deadline, "indexing made no progress"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        try:  # the driver's local Ray (raylet, workers) shares its process group
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    partial = rows_per_page(db)
    assert 0 < sum(partial.values()) < PAGES and max(partial.values()) == 1
    complete = {path for path, state in PageStore.open(db).documents().items()
                if state.is_current(content_hash(Path(path)))}

    changed, gone = docs / sorted(p.name for p in docs.glob("*.jpg"))[-1], docs / "report.pdf"
    shutil.copy(sorted(docs.glob("*.jpg"))[0], changed)  # a file changes between the runs
    gone.unlink()  # and one disappears
    done = cli(*ray_index_args(docs, db, "--json", "--prune"))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["failed"] == [] and summary["rows"] == PHOTOS
    assert set(summary["skipped"]) == complete - {str(changed.resolve()), str(gone.resolve())}
    assert summary["pruned"] == ([str(gone.resolve())] if str(gone.resolve()) in {p for p, _ in partial} else [])
    counts = rows_per_page(db)
    assert counts == expected_pages(docs) and max(counts.values()) == 1  # every page present, none twice
    assert_vectors_equal_encode(db, docs, tiny_composed)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray in this process (2 workers' worth), shut down after the module's tests."""
    ray = pytest.importorskip("ray")
    from magic_mm.bulk import start_ray

    assert not ray.is_initialized()
    start_ray(None, workers=WORKERS)
    yield ray
    ray.shutdown()


def actor_pids() -> set[int]:
    """Embedding actors of this process's Ray (its descendants), by their process title."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = set(), [os.getpid()]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            try:
                title = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if title.startswith(ACTOR_TITLE):
                found.add(pid)
    return found


@pytest.fixture(scope="module")
def long_job_folder(photo_folder, tmp_path_factory) -> Path:
    """The photo folder with every photo in it four times (243 pages): enough work that the
    actors are still embedding when the first pages are committed, however fast they run."""
    folder = tmp_path_factory.mktemp("bulk-long") / "docs"
    shutil.copytree(photo_folder, folder)
    for photo in sorted(photo_folder.glob("*.jpg")):
        for copy in range(1, 4):
            shutil.copy(photo, folder / f"copy{copy}-{photo.name}")
    return folder


def test_worker_actors_killed_mid_job_lose_and_duplicate_nothing(ray_session, long_job_folder, tiny_composed,
                                                                 tmp_path):
    from magic_mm.bulk import worker_resources
    from magic_mm.index.ray_engine import index_paths_ray

    pages = 4 * PHOTOS + PDF_PAGES
    db = tmp_path / "worker.lance"
    store = PageStore.open_or_create(db, ModelStamp.of(tiny_composed, MODEL))
    outcome: dict[str, object] = {}

    def job() -> None:
        try:
            outcome["summary"] = index_paths_ray(MODEL, store, [long_job_folder], worker_resources(WORKERS, 0, 1),
                                                 "float32", batch_size=2)
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 600
    while not (store.count() > 0 and len(actor_pids()) == WORKERS):  # mid-job: pages are being committed
        assert thread.is_alive(), f"the job ended before a worker could be killed: {outcome}"
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.05)
    # Kill every actor, not one: a single victim may be idle at that instant, and then the
    # job can finish on the other actor before Ray's restart of the victim gets going.
    before = actor_pids()
    rows_at_kill = store.count()
    for victim in before:
        os.kill(victim, signal.SIGKILL)
    started_after = set()
    while thread.is_alive():
        started_after |= actor_pids() - before
        thread.join(0.1)
    assert "error" not in outcome, outcome.get("error")
    assert rows_at_kill < pages, "the worker was killed after the job's last commit"
    assert started_after, "Ray did not start a worker in place of the killed ones"
    summary = outcome["summary"]
    assert summary.failed == [] and summary.rows == summary.pages_embedded == pages
    counts = rows_per_page(db)
    assert counts == expected_pages(long_job_folder) and max(counts.values()) == 1
    assert_vectors_equal_encode(db, long_job_folder, tiny_composed)


def test_bulk_embed_equals_encode(ray_session, flickr_dir, tiny_composed):
    from magic_mm import bulk
    from magic_mm.data.captions import read_captioned_images

    items = read_captioned_images(flickr_dir)[:100]
    rows = [{"id": i, "image": item.path.read_bytes(), "caption": item.captions[0]} for i, item in enumerate(items)]
    dataset = ray_session.data.from_items(rows, override_num_blocks=4)
    images = bulk.embed(dataset, model=MODEL, role="candidate", column="image", output_column="image_embedding",
                        workers=WORKERS, batch_size=8)
    both = bulk.embed(images, model=MODEL, role="query", column="caption", workers=WORKERS, batch_size=8)
    out = sorted(both.take_all(), key=lambda row: row["id"])
    assert [row["id"] for row in out] == list(range(100))
    np.testing.assert_allclose(np.stack([r["image_embedding"] for r in out]),
                               tiny_composed.encode([r["image"] for r in rows], role="candidate"), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.stack([r["embedding"] for r in out]),
                               tiny_composed.encode([r["caption"] for r in rows], role="query"), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="column 'photo': the dataset has no such column"):
        bulk.embed(dataset, model=MODEL, column="photo")


def test_without_ray_the_ray_engine_says_how_to_install_it(run_cli, monkeypatch, tmp_path):
    for name in ("ray", "ray.data"):
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` now raises ImportError
    (tmp_path / "docs").mkdir()
    code, out, err = run_cli("index", tmp_path / "docs", "--db", tmp_path / "db.lance", "--model", MODEL,
                             "--engine", "ray")
    assert code == 2 and "needs Ray Data, which is not installed" in err
    assert "pip install 'magic-mm[ray]'" in err and "Traceback" not in err
    from magic_mm import bulk

    with pytest.raises(bulk.RayMissingError, match=r"magic_mm.bulk.embed needs Ray Data.*magic-mm\[ray\]"):
        bulk.embed(object(), model=MODEL, column="text")
    assert not (tmp_path / "db.lance").exists()


def test_ray_options_need_the_ray_engine(run_cli, tmp_path):
    code, out, err = run_cli("index", tmp_path, "--db", tmp_path / "db.lance", "--workers", "2")
    assert code == 2 and "add --engine ray" in err
    code, out, err = run_cli("index", tmp_path, "--db", tmp_path / "db.lance", "--engine", "spark")
    assert code == 2 and "--engine 'spark': choose one of local, ray" in err
