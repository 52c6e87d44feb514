"""Incremental indexing into LanceDB, search, rerank plumbing, and the kill-and-resume guarantee."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pypdfium2
import pytest
from conftest import REPO, make_image

from magic_mm.errors import UserError
from magic_mm.index.files import content_hash, find_documents
from magic_mm.index.indexer import index_paths
from magic_mm.index.search import (
    RerankerUnavailableError,
    embed_query,
    load_reranker,
    query_input,
    reranker_scores,
    retrieve,
)
from magic_mm.index.store import DocumentState, IndexDbError, ModelStamp, PageStore
from magic_mm.model.inputs import MMInput

MODEL = "tiny-random-composed"


def make_pdf(path: Path, pages: int, seed: int) -> Path:
    images = [make_image(60, 80, seed * 100 + i) for i in range(pages)]
    images[0].save(path, "PDF", save_all=True, append_images=images[1:])
    return path


def make_docs(folder: Path, images: int, pdfs: dict[str, int]) -> int:
    """``images`` PNG files plus PDFs ``{name: pages}``; returns the number of pages."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        make_image(48, 40, seed=i).save(folder / f"photo_{i:03d}.png")
    (folder / "docs").mkdir(exist_ok=True)
    for n, (name, pages) in enumerate(pdfs.items()):
        make_pdf(folder / "docs" / name, pages, seed=1000 + n)
    return images + sum(pdfs.values())


def rows_per_page(db: Path) -> Counter:
    store = PageStore.open(db)
    table = store.table.search().select(["path", "page"]).limit(None).to_arrow()
    return Counter(zip(table["path"].to_pylist(), table["page"].to_pylist()))


def expected_pages(folder: Path) -> Counter:
    pages = Counter()
    for doc in find_documents([folder]):
        count = 1 if doc.kind == "image" else len(pypdfium2.PdfDocument(str(doc.path)))
        for page in range(1, count + 1):
            pages[(str(doc.path), page)] = 1
    return pages


@pytest.fixture
def store_for(tiny_composed, tmp_path):
    def make(name: str = "db.lance") -> PageStore:
        return PageStore.open_or_create(tmp_path / name, ModelStamp.of(tiny_composed, MODEL))
    return make


@pytest.fixture(scope="module")
def shared_index(tiny_composed, tmp_path_factory) -> PageStore:
    """One small index (5 photos, a 2-page PDF) for the tests that only read."""
    folder = tmp_path_factory.mktemp("shared")
    make_docs(folder / "docs", images=5, pdfs={"p.pdf": 2})
    store = PageStore.open_or_create(folder / "db.lance", ModelStamp.of(tiny_composed, MODEL))
    index_paths(tiny_composed, store, [folder / "docs"])
    return store


def test_index_then_incremental_update_skip_and_prune(tiny_composed, store_for, tmp_path):
    docs = tmp_path / "docs"
    total = make_docs(docs, images=4, pdfs={"report.pdf": 3})  # 7 pages
    store = store_for()
    first = index_paths(tiny_composed, store, [docs], batch_size=3)
    assert len(first.added) == 5 and first.pages_embedded == total == store.count() == 7
    assert rows_per_page(store.db_path) == expected_pages(docs)

    # unchanged → skipped; changed → updated; new → added; deleted → reported, removed only with --prune
    make_image(48, 40, seed=99).save(docs / "photo_001.png")
    make_image(30, 30, seed=98).save(docs / "new.png")
    (docs / "photo_003.png").unlink()
    make_pdf(docs / "docs" / "report.pdf", 2, seed=7)  # now 2 pages instead of 3
    second = index_paths(tiny_composed, store, [docs])
    assert sorted(Path(p).name for p in second.updated) == ["photo_001.png", "report.pdf"]
    assert [Path(p).name for p in second.added] == ["new.png"]
    assert sorted(Path(p).name for p in second.skipped) == ["photo_000.png", "photo_002.png"]
    assert [Path(p).name for p in second.missing] == ["photo_003.png"] and second.pruned == []
    assert second.pages_embedded == 4
    third = index_paths(tiny_composed, store, [docs], prune=True)
    assert [Path(p).name for p in third.pruned] == ["photo_003.png"] and third.pages_embedded == 0
    assert rows_per_page(store.db_path) == expected_pages(docs)
    # stored hashes are the current content
    hashes = dict(zip(*(store.table.to_arrow()[c].to_pylist() for c in ("path", "hash"))))
    assert all(hashes[str(p)] == content_hash(p) for p in docs.rglob("*.p*"))


def test_bad_files_are_reported_with_reasons_and_others_still_indexed(tiny_composed, store_for, tmp_path):
    docs = tmp_path / "docs"
    make_docs(docs, images=2, pdfs={})
    (docs / "broken.jpg").write_bytes(b"definitely not a jpeg")
    (docs / "empty.png").write_bytes(b"")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    summary = index_paths(tiny_composed, store_for(), [docs])
    reasons = {Path(f["path"]).name: f["reason"] for f in summary.failed}
    assert set(reasons) == {"broken.jpg", "empty.png", "broken.pdf"}
    assert "not a readable image" in reasons["broken.jpg"] and "empty" in reasons["empty.png"]
    assert "cannot open the PDF" in reasons["broken.pdf"]
    assert len(summary.added) == 2


def test_crash_leftovers_are_repaired(tiny_composed, store_for, tmp_path):
    """Rows a crashed run could leave (a page twice, a document half there) are rewritten."""
    docs = tmp_path / "docs"
    make_docs(docs, images=2, pdfs={"a.pdf": 3})
    store = store_for()
    index_paths(tiny_composed, store, [docs])
    table = store.table.to_arrow()
    store.table.add(table.filter(pc.equal(table["path"], str(docs / "photo_000.png"))))  # a page twice
    store.table.delete(f"path = '{docs / 'docs' / 'a.pdf'}' AND page = 2")  # a PDF missing a page
    summary = index_paths(tiny_composed, store, [docs])
    assert len(summary.updated) == 2 and len(summary.skipped) == 1
    assert rows_per_page(store.db_path) == expected_pages(docs)


def test_document_state_requires_exactly_one_row_per_page():
    assert DocumentState([("h", 1, 2), ("h", 2, 2)]).is_current("h")
    assert not DocumentState([("h", 1, 2), ("h", 2, 2)]).is_current("other")
    assert not DocumentState([("h", 1, 2)]).is_current("h")
    assert not DocumentState([("h", 1, 2), ("h", 2, 2), ("h", 2, 2)]).is_current("h")
    assert not DocumentState([]).is_current("h")


def test_search_matches_brute_force_and_refuses_other_models(tiny_composed, shared_index):
    store = shared_index
    query = query_input("a small red boat", None)
    vector = embed_query(tiny_composed, query)
    hits = retrieve(store, vector, k=4)
    data = store.table.to_arrow()
    scores = np.stack(data["vector"].to_numpy(zero_copy_only=False)) @ vector
    best = np.sort(scores)[::-1][:4]
    np.testing.assert_allclose([h.score for h in hits], best, atol=1e-5)
    assert [h.rank for h in hits] == [1, 2, 3, 4]
    other = ModelStamp(model="other-model", compression="bilinear:2", dim=64, fingerprint="0" * 16)
    with pytest.raises(IndexDbError, match="was built with model 'tiny-random-composed'.*--model tiny-random-composed"):
        store.check_model(other)
    with pytest.raises(UserError, match="empty query"):
        query_input("  ", None)


class ReversingReranker:
    """Stands in for MagicReranker: prefers the candidates the embedder ranked last."""

    def __init__(self, answer: str) -> None:
        self.answer, self.calls = answer, 0

    def rerank(self, query, candidates, top_k=5):
        self.calls += 1
        scores = [float(i) for i in range(len(candidates))]
        if self.answer == "scores":
            return np.array(scores)
        return sorted(((i, s) for i, s in enumerate(scores)), key=lambda p: -p[1])[:top_k]


@pytest.mark.parametrize("answer", ["scores", "pairs"])
def test_rerank_reorders_the_head_only(tiny_composed, shared_index, answer):
    store = shared_index
    query = query_input("a photo", None)
    vector = embed_query(tiny_composed, query)
    plain = retrieve(store, vector, k=7)
    reranker = ReversingReranker(answer)
    reranked = retrieve(store, vector, k=7, query=query, reranker=reranker, rerank_top=3)
    assert reranker.calls == 1
    assert [h.path for h in reranked[:3]] == [h.path for h in plain[:3]][::-1]
    assert [h.path for h in reranked[3:]] == [h.path for h in plain[3:]]
    assert [h.rerank_score for h in reranked[:3]] == [2.0, 1.0, 0.0]
    assert reranker_scores(reranker, query, [query, query]) == [0.0, 1.0]


def test_rerank_unavailable_is_a_clear_user_error(tmp_path):
    from magic_mm import MagicEmbedder

    folder = tmp_path / "embedder-only"
    MagicEmbedder.from_pretrained(MODEL).save_pretrained(folder)
    with pytest.raises(RerankerUnavailableError, match="reranking is not available for model .*not a reranker folder"):
        load_reranker(str(folder))


def test_cli_index_and_search(run_cli, tmp_path):
    docs = tmp_path / "docs"
    make_docs(docs, images=3, pdfs={"p.pdf": 2})
    db = tmp_path / "cli.lance"
    code, out, err = run_cli("index", docs, "--db", db, "--model", MODEL, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["counts"]["added"] == 4 and summary["rows"] == 5
    code, out, err = run_cli("search", "a cat", "--db", db, "--k", "3", "--json")  # model taken from the index
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["rank"] for r in results] == [1, 2, 3] and all({"score", "path", "page"} <= set(r) for r in results)
    code, out, err = run_cli("search", "--image", docs / "photo_000.png", "--db", db, "--model", "tiny-random-internvl")
    assert code == 2 and "was built with model 'tiny-random-composed'" in err
    code, out, err = run_cli("search", "--db", tmp_path / "none.lance", "x")
    assert code == 2 and "no index there" in err
    code, out, err = run_cli("index", tmp_path / "missing", "--db", db)
    assert code == 2 and "no such file or folder" in err


def test_killed_indexing_run_resumes_to_exactly_one_row_per_page(tmp_path, tiny_composed):
    """SIGKILL a real `magic-mm index` process mid-run, change a file, run again: every page exactly once."""
    docs = tmp_path / "docs"
    pages = make_docs(docs, images=10, pdfs={"a.pdf": 3, "b.pdf": 2})
    db = tmp_path / "kill.lance"
    command = [sys.executable, "-m", "magic_mm.cli", "index", str(docs), "--db", str(db), "--model", MODEL,
               "--batch-size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def version() -> int:
        try:
            return PageStore.open(db).table.version
        except UserError:
            return 0

    def run_and_kill(after_commits: int) -> None:
        """Start indexing; SIGKILL it once it has made ``after_commits`` more commits (it is mid-run then)."""
        start = version()
        process = subprocess.Popen(command + ["--quiet"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while version() < start + after_commits:
            assert process.poll() is None, f"indexing ended before it could be killed: {process.stderr.read()}"
            assert time.monotonic() < deadline, "indexing made no progress"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL

    run_and_kill(after_commits=3)  # creating the table is the first commit
    partial = rows_per_page(db)
    assert 0 < sum(partial.values()) < pages
    make_image(48, 40, seed=500).save(docs / "photo_000.png")  # a file changes between runs

    done = subprocess.run(command + ["--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["failed"] == [] and summary["rows"] == pages
    counts = rows_per_page(db)
    assert counts == expected_pages(docs) and max(counts.values()) == 1  # every page present, none twice
    store = PageStore.open(db)
    row_hash = dict(zip(*(store.table.to_arrow()[c].to_pylist() for c in ("path", "hash"))))
    assert row_hash[str((docs / "photo_000.png").resolve())] == content_hash(docs / "photo_000.png")
    again = index_paths(tiny_composed, store, [docs])  # and a further run has nothing left to do
    assert len(again.skipped) == 12 and again.pages_embedded == 0


@pytest.mark.parametrize("kind", ["ivf-pq", "hnsw"])
def test_ann_index_is_used_and_exact_search_stays_available(tmp_path, kind):
    dim, rows = 64, 600
    stamp = ModelStamp(model=MODEL, compression="bilinear:2", dim=dim, fingerprint="f" * 16)
    store = PageStore.open_or_create(tmp_path / "ann.lance", stamp)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [f"/photos/{i:04d}.jpg" for i in range(rows)]
    store.replace(paths, [{"path": p, "kind": "image", "page": 1, "pages": 1, "hash": "h"} for p in paths], vectors)
    store.build_ann(kind)
    assert store.table.list_indices()
    query = vectors[7]
    approx = store.search(query, 10)
    exact = store.search(query, 10, exact=True)
    assert len(approx) == 10 and approx[0].path == exact[0].path == paths[7]  # a stored vector finds itself
    assert [h.path for h in exact] == [paths[i] for i in np.argsort(-(vectors @ query))[:10]]
    with pytest.raises(UserError, match="choose one of"):
        store.build_ann("flat")


def test_ann_needs_enough_rows(tmp_path):
    stamp = ModelStamp(model=MODEL, compression="bilinear:2", dim=8, fingerprint="f" * 16)
    store = PageStore.open_or_create(tmp_path / "small.lance", stamp)
    with pytest.raises(UserError, match="needs at least 256"):
        store.build_ann("ivf-pq")


def test_retrieve_with_the_real_magic_reranker_class(tiny_composed, shared_index):
    """The adapter speaks MagicReranker's actual API (ranked RerankHit objects)."""
    reranker_module = pytest.importorskip("magic_mm.model.reranker")
    reranker = reranker_module.MagicReranker(tiny_composed)
    query = query_input("a dog", None)
    hits = retrieve(shared_index, embed_query(tiny_composed, query), k=3, query=query, reranker=reranker,
                    rerank_top=3)
    from magic_mm.index.files import page_image

    direct = reranker.score(query, [MMInput(image=page_image(Path(h.path), h.kind, h.page)) for h in hits])
    np.testing.assert_allclose([h.rerank_score for h in hits], direct, atol=1e-5)
    assert [h.rerank_score for h in hits] == sorted((h.rerank_score for h in hits), reverse=True)


def test_changed_weights_of_the_same_model_ask_for_rebuild(tiny_composed, tmp_path):
    store = PageStore.open_or_create(tmp_path / "w.lance", ModelStamp.of(tiny_composed, MODEL))
    changed = ModelStamp(model=MODEL, compression="bilinear:2", dim=64, fingerprint="0" * 16)
    with pytest.raises(IndexDbError, match="earlier version of 'tiny-random-composed'.*--rebuild"):
        PageStore.open_or_create(tmp_path / "w.lance", changed)
    rebuilt = PageStore.open_or_create(tmp_path / "w.lance", changed, rebuild=True)
    assert rebuilt.stamp == changed and rebuilt.count() == 0


def test_a_large_jpeg_is_indexed_at_the_models_decode_scale(tiny_composed, store_for, tmp_path):
    """The indexer decodes a JPEG as ``encode`` does (at a reduced scale down to the model's
    448 × 448, here 128 × 128), so searching with the same file finds its own vector."""
    from PIL import Image

    docs = tmp_path / "docs"
    docs.mkdir()
    make_image(1000, 700, seed=5).save(docs / "big.jpg", "JPEG")
    store = store_for()
    index_paths(tiny_composed, store, [docs])
    stored = np.stack(store.table.to_arrow()["vector"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(stored[0], tiny_composed.encode([docs / "big.jpg"], role="candidate")[0],
                               atol=1e-5, rtol=0)
    full_size = tiny_composed.encode([Image.open(docs / "big.jpg")], role="candidate")[0]
    assert np.abs(stored[0] - full_size).max() > 1e-3  # decoded at a reduced scale, not in full
