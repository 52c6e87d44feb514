"""Incremental indexing: embed the pages of new and changed documents, skip the rest.

Per run: scan the paths, hash every file, and compare with the table.  A document
whose rows are exactly pages 1..N of the same content is skipped; any other is
(re-)embedded and written with ``PageStore.replace`` (delete, then one atomic add).
Documents are flushed in groups of about ``batch_size`` pages, so a kill loses at most
one group's work and never leaves a page twice (see ``magic_mm.index.store``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from magic_mm.errors import UserError
from magic_mm.index.files import Document, content_hash, find_documents, render_pages
from magic_mm.index.store import PageStore
from magic_mm.model.embedder import MagicEmbedder
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
class _Pending:
    doc: Document
    file_hash: str
    pages: list[Image.Image]
    existed: bool


def index_paths(
    embedder: MagicEmbedder,
    store: PageStore,
    paths: Iterable[Path],
    prune: bool = False,
    batch_size: int = 16,
    limit: int | None = None,
    show_progress: bool = False,
) -> IndexSummary:
    """Bring ``store`` up to date with the image and PDF files under ``paths``."""
    roots = [Path(p).expanduser().resolve() for p in paths]
    docs = find_documents(roots)
    if limit is not None:
        docs = docs[:limit]
    existing = store.documents()
    summary = IndexSummary()
    pending: list[_Pending] = []
    stale: list[str] = []  # rows of documents that changed and now fail: they describe old content

    def flush() -> None:
        images = [image for item in pending for image in item.pages]
        vectors = embedder.encode(images, role="candidate", batch_size=batch_size) if images else None
        rows = [{"path": str(item.doc.path), "kind": item.doc.kind, "page": number, "pages": len(item.pages),
                 "hash": item.file_hash} for item in pending for number in range(1, len(item.pages) + 1)]
        store.replace([str(item.doc.path) for item in pending] + stale, rows, vectors)
        for item in pending:
            (summary.updated if item.existed else summary.added).append(str(item.doc.path))
        summary.pages_embedded += len(images)
        advance(len(pending))
        pending.clear()
        stale.clear()

    with progress(len(docs), show_progress, "indexing") as advance:
        for doc in docs:
            key = str(doc.path)
            state = existing.get(key)
            try:
                file_hash = content_hash(doc.path)
                if state is not None and state.is_current(file_hash):
                    summary.skipped.append(key)
                    advance(1)
                    continue
                pages = render_pages(doc, embedder.max_image_pixels)
            except (UserError, OSError) as exc:
                summary.failed.append({"path": key, "reason": str(exc)})
                if state is not None:
                    stale.append(key)
                advance(1)
                continue
            pending.append(_Pending(doc, file_hash, pages, state is not None))
            if sum(len(p.pages) for p in pending) >= batch_size:
                flush()
        if pending or stale:
            flush()

    seen = {str(d.path) for d in docs}
    gone = sorted(path for path in existing if path not in seen and _under(Path(path), roots)
                  and (limit is None or not Path(path).exists()))
    if prune:
        store.delete_paths(gone)
        summary.pruned = gone
    else:
        summary.missing = [p for p in gone if not Path(p).exists()]
    if summary.pages_embedded or summary.pruned or stale:
        store.optimize()
    summary.rows = store.count()
    return summary


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)
