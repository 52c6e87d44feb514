"""Incremental indexing: embed the pages of new and changed documents, skip the rest.

Per run: scan the paths, hash every file, and compare with the table.  A document
whose rows are exactly pages 1..N of the same content is skipped; any other is
(re-)embedded and written with ``PageStore.replace`` (delete, then one atomic add).
Documents are flushed in groups of about ``batch_size`` pages, so a kill loses at most
the groups being embedded (one more than the model workers) and never leaves a page twice
(see ``magic_mm.index.store``).

The rules live in ``IndexRun`` (what to skip, what a failure does, how a group of
documents is written, pruning and the summary); ``index_paths`` drives it in this process
and ``magic_mm.index.ray_engine`` drives the same ``IndexRun`` from a Ray job, so the two
engines build interchangeable indexes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from magic_mm.errors import UserError
from magic_mm.index.files import Document, content_hash, find_documents, render_pages
from magic_mm.index.store import PageStore
from magic_mm.model.embedder import MagicEmbedder
from magic_mm.model.workers import map_in_order, model_worker_pool
from magic_mm.progress import progress


@dataclass
class IndexSummary:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    pruned: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # gone from disk, kept because --prune was not given
    pages_embedded: int = 0
    rows: int = 0

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("added", "updated", "skipped", "failed", "pruned",
                                                            "missing")}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "counts": self.counts()}


@dataclass
class EmbeddedDocument:
    """A document whose pages are embedded and ready to be written (one vector per page)."""

    path: str
    kind: str
    file_hash: str
    vectors: np.ndarray  # (pages, dim), page 1 first


class IndexRun:
    """One indexing run's rules and bookkeeping, whichever engine embeds the pages.

    Use: ``documents`` (found under the roots), then per document either ``is_current``
    → ``skip``, ``fail``, or ``add`` (its embedded pages; written in groups of about
    ``batch_size`` pages), and at the end ``finish``.
    """

    def __init__(self, store: PageStore, roots: list[Path], documents: list[Document], prune: bool = False,
                 limit: int | None = None, batch_size: int = 16) -> None:
        self.store, self.roots, self.prune, self.limit, self.batch_size = store, roots, prune, limit, batch_size
        self.documents = documents[:limit] if limit is not None else documents
        self.existing = store.documents()
        self.summary = IndexSummary()
        self.ready: list[EmbeddedDocument] = []
        self.stale: list[str] = []  # rows of documents that changed and now fail: they describe old content
        self.wrote_stale = False

    def existed(self, path: str) -> bool:
        return path in self.existing

    def is_current(self, path: str, file_hash: str) -> bool:
        """True when ``path``'s rows are exactly pages 1..N of the content ``file_hash``."""
        state = self.existing.get(path)
        return state is not None and state.is_current(file_hash)

    def current_hash(self, path: str) -> str | None:
        """The hash ``path``'s rows are complete for (what a worker compares its hash with), if any."""
        state = self.existing.get(path)
        if state is None or not state.rows:
            return None
        file_hash = state.rows[0][0]
        return file_hash if state.is_current(file_hash) else None

    def skip(self, path: str) -> None:
        self.summary.skipped.append(path)

    def fail(self, path: str, reason: str) -> None:
        self.summary.failed.append({"path": path, "reason": reason})
        if path in self.existing:
            self.stale.append(path)

    def add(self, document: EmbeddedDocument) -> int:
        """Queue an embedded document; writes the queue once it holds ``batch_size`` pages.
        Returns the number of pages written now (0 while queued)."""
        self.ready.append(document)
        if sum(len(d.vectors) for d in self.ready) >= self.batch_size:
            return self.flush()
        return 0

    def flush(self) -> int:
        """Write the queued documents (and drop stale rows): delete their rows, then one atomic add."""
        if not self.ready and not self.stale:
            return 0
        rows = [{"path": d.path, "kind": d.kind, "page": number, "pages": len(d.vectors), "hash": d.file_hash}
                for d in self.ready for number in range(1, len(d.vectors) + 1)]
        vectors = np.concatenate([d.vectors for d in self.ready]) if self.ready else None
        self.store.replace([d.path for d in self.ready] + self.stale, rows, vectors)
        for d in self.ready:
            (self.summary.updated if self.existed(d.path) else self.summary.added).append(d.path)
        self.summary.pages_embedded += len(rows)
        self.wrote_stale = self.wrote_stale or bool(self.stale)
        self.ready, self.stale = [], []
        return len(rows)

    def finish(self) -> IndexSummary:
        """Write what is queued, then prune (or list) documents gone from disk; compact; count rows."""
        self.flush()
        summary = self.summary
        for names in (summary.added, summary.updated, summary.skipped):  # engines finish documents in any order
            names.sort()
        summary.failed.sort(key=lambda failure: failure["path"])
        seen = {str(d.path) for d in self.documents}
        gone = sorted(path for path in self.existing if path not in seen and _under(Path(path), self.roots)
                      and (self.limit is None or not Path(path).exists()))
        if self.prune:
            self.store.delete_paths(gone)
            summary.pruned = gone
        else:
            summary.missing = [p for p in gone if not Path(p).exists()]
        if summary.pages_embedded or summary.pruned or self.wrote_stale:
            self.store.optimize()
        summary.rows = self.store.count()
        return summary


def resolve_roots(paths: Iterable[Path | str]) -> list[Path]:
    return [Path(p).expanduser().resolve() for p in paths]


def load_pages(doc: Document, max_pixels: int, decode_size: tuple[int, int] | None) -> list[Image.Image]:
    """The pages of a document to embed; a bad file raises ``UserError`` or ``OSError``."""
    return render_pages(doc, max_pixels, decode_size)


def index_paths(
    embedder: MagicEmbedder,
    store: PageStore,
    paths: Iterable[Path],
    prune: bool = False,
    batch_size: int = 16,
    limit: int | None = None,
    show_progress: bool = False,
    workers: int | None = None,
) -> IndexSummary:
    """Bring ``store`` up to date with the image and PDF files under ``paths`` (in this process).

    On a CPU, ``workers`` batches (default ``embedder.model_workers``) are embedded side by side,
    each on its share of torch's threads, while this thread hashes and decodes the next files
    and writes finished batches in file order (``magic_mm.model.workers``)."""
    roots = resolve_roots(paths)
    run = IndexRun(store, roots, find_documents(roots), prune=prune, limit=limit, batch_size=batch_size)
    workers = embedder.model_workers if workers is None else workers
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers} (--image-workers on the command line)")
    Group = list[tuple[Document, str, list[Image.Image]]]

    def groups(advance: Callable[[int], None]) -> Iterator[Group]:
        """The files to embed, decoded, in groups of about ``batch_size`` pages; current files
        are skipped and unreadable ones recorded as they come."""
        pending: Group = []
        for doc in run.documents:
            key = str(doc.path)
            try:
                file_hash = content_hash(doc.path)
                if run.is_current(key, file_hash):
                    run.skip(key)
                    advance(1)
                    continue
                pages = load_pages(doc, embedder.max_image_pixels, embedder.backbone.decode_size)
            except (UserError, OSError) as exc:
                run.fail(key, str(exc))
                advance(1)
                continue
            pending.append((doc, file_hash, pages))
            if sum(len(p) for _, _, p in pending) >= batch_size:
                yield pending
                pending = []
        if pending:
            yield pending

    def embed(group: Group) -> np.ndarray:
        # One batch per call (the group is about batch_size pages), on the thread it runs on.
        return embedder.encode([image for _, _, pages in group for image in pages], role="candidate",
                               batch_size=batch_size, workers=1)

    pool = model_worker_pool(embedder.backbone.device, workers, "magic-mm-index")
    with progress(len(run.documents), show_progress, "indexing", rate_unit="rows") as advance, \
            pool or nullcontext():
        for group, vectors in map_in_order(embed, groups(advance), pool, workers):
            start = 0
            for doc, file_hash, pages in group:
                run.ready.append(EmbeddedDocument(str(doc.path), doc.kind, file_hash, vectors[start:start + len(pages)]))
                start += len(pages)
            advance(len(group), run.flush())
    return run.finish()


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)
