"""``magic-mm index --engine ray``: the local engine's rules, with the work spread over Ray.

The job, as Ray sees it:

1. **list** — one Ray task per given path finds its image and PDF files;
2. **read** — Ray Data tasks hash each file, compare the hash with the rows the index holds
   (the driver ships, per file, the hash its rows are complete for), and decode the image or
   render the PDF's pages (one row per page, pixels as a uint8 array);
3. **embed** — an actor pool (``map_batches`` with a class, ``--workers`` actors, one model
   each, loaded once, ``--gpus-per-worker`` GPUs each) turns the pages into vectors;
4. **commit** — the driver gathers each document's pages and hands complete documents to the
   same ``IndexRun`` as the local engine, which writes them in groups of about
   ``batch_size`` pages (delete their rows, then one atomic add).

Only the driver writes, so commits never race.  A worker that dies is restarted by Ray and
its batch is re-run; the driver keys pages by (path, page), so a re-run batch cannot add a
page twice.  A driver that dies loses at most the pages not yet committed; the next run
skips every document whose rows are complete, exactly like the local engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from magic_mm.bulk import EmbedWorker, WorkerResources, unwrap_ray_error
from magic_mm.errors import UserError
from magic_mm.index.files import Document, content_hash, find_documents
from magic_mm.index.indexer import EmbeddedDocument, IndexRun, IndexSummary, load_pages, resolve_roots
from magic_mm.index.store import PageStore
from magic_mm.progress import progress

PAGE, SKIPPED, FAILED = "page", "skipped", "failed"
# Documents per read task: small enough that PDFs spread over tasks, large enough to amortise a task.
READ_BATCH = 8
# What a read task reserves: its process (Python, PIL, pypdfium2 and the torch that magic_mm's
# modules import: about 250 MB) and the pages it renders (8 PDF pages at 1024 px: about 20 MB).  Also
# keeps Ray Data from fusing the reads into the embedding actors: operators with different
# resources stay separate, so decoding runs in its own tasks, not serially on the GPU workers.
READ_TASK_MEMORY = 512 * 2**20
_PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)  # the "image" of a row that is not a page


def list_documents(roots: list[Path]) -> list[Document]:
    """``find_documents`` with one Ray task per root, merged as the local engine does (sorted, unique)."""
    import ray

    task = ray.remote(num_cpus=1)(find_documents)
    try:
        found = ray.get([task.remote([root]) for root in roots])
    except Exception as exc:
        raise unwrap_ray_error(exc) from None
    unique = {doc.path: doc for docs in found for doc in docs}
    return [unique[path] for path in sorted(unique)]


def read_documents(batch: dict[str, np.ndarray], max_pixels: int,
                   decode_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """A read task: hash each document; skip it if its rows are complete, else emit one row per page."""
    out: dict[str, list[Any]] = {name: [] for name in ("path", "kind", "hash", "status", "reason", "page", "pages",
                                                       "image")}

    def emit(path: str, kind: str, file_hash: str, status: str, reason: str = "", page: int = 0, pages: int = 0,
             image: np.ndarray = _PLACEHOLDER) -> None:
        for name, value in zip(out, (path, kind, file_hash, status, reason, page, pages, image)):
            out[name].append(value)

    for path, kind, current in zip(batch["path"], batch["kind"], batch["current"]):
        path, kind = str(path), str(kind)
        try:
            file_hash = content_hash(Path(path))
            if file_hash == current:
                emit(path, kind, file_hash, SKIPPED)
                continue
            pages = load_pages(Document(Path(path), kind), max_pixels, decode_size)
        except (UserError, OSError) as exc:
            emit(path, kind, "", FAILED, str(exc))
            continue
        for number, page in enumerate(pages, 1):
            emit(path, kind, file_hash, PAGE, page=number, pages=len(pages), image=np.asarray(page.convert("RGB")))
    return out


class PageWorker(EmbedWorker):
    """The embed stage's actor: the page rows' images → ``vector``; other rows pass through.
    The images stay behind: only vectors travel to the driver."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        is_page = batch["status"] == PAGE
        vectors = np.zeros((len(is_page), self.embedder.embedding_dim), np.float32)
        if is_page.any():
            images = [Image.fromarray(batch["image"][i]) for i in np.flatnonzero(is_page)]
            vectors[is_page] = self.encode(images, role="candidate")
        out = {name: values for name, values in batch.items() if name != "image"}
        out["vector"] = vectors
        return out


def index_paths_ray(
    model: str,
    store: PageStore,
    paths: Iterable[Path],
    resources: WorkerResources,
    dtype: str,
    compression: str | None = None,
    max_pixels: int | None = None,
    decode_size: tuple[int, int] | None = None,
    prune: bool = False,
    batch_size: int = 16,
    limit: int | None = None,
    show_progress: bool = False,
) -> IndexSummary:
    """Bring ``store`` up to date with the files under ``paths``, on the connected Ray cluster.

    ``model``, ``compression`` and ``dtype`` (a resolved name, e.g. ``float32``) are what each
    worker loads; they must be the ones ``store`` was stamped with. ``max_pixels`` and
    ``decode_size`` are the model's, for the read tasks (which load no model).
    """
    import ray.data

    from magic_mm.model.inputs import MAX_IMAGE_PIXELS

    roots = resolve_roots(paths)
    run = IndexRun(store, roots, list_documents(roots), prune=prune, limit=limit, batch_size=batch_size)
    if not run.documents:
        return run.finish()
    items = [{"path": str(d.path), "kind": d.kind, "current": run.current_hash(str(d.path)) or ""}
             for d in run.documents]
    dataset = (
        ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // READ_BATCH, 10_000)))
        .map_batches(read_documents, fn_kwargs={"max_pixels": max_pixels or MAX_IMAGE_PIXELS,
                                                "decode_size": decode_size},
                     batch_size=READ_BATCH, batch_format="numpy", num_cpus=1, memory=READ_TASK_MEMORY)
        .map_batches(PageWorker, fn_constructor_kwargs={"model": model, "compression": compression, "dtype": dtype,
                                                         "cpus": resources.cpus, "batch_size": batch_size},
                     batch_size=batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=resources.workers),
                     num_cpus=resources.cpus, num_gpus=resources.gpus or None)
    )
    gathering: dict[str, dict[int, np.ndarray]] = {}  # path → its pages embedded so far
    finished: set[str] = set()
    with progress(len(run.documents), show_progress, f"indexing on {resources.workers} Ray worker(s)",
                  rate_unit="rows") as advance:
        try:
            batches = dataset.iter_batches(batch_size=None, batch_format="numpy")
            for batch in batches:
                for i, path in enumerate(batch["path"].tolist()):
                    if path in finished:
                        continue  # a re-run batch's copy
                    status = batch["status"][i]
                    if status == SKIPPED:
                        run.skip(path)
                    elif status == FAILED:
                        run.fail(path, str(batch["reason"][i]))
                    else:
                        pages = gathering.setdefault(path, {})
                        pages[int(batch["page"][i])] = batch["vector"][i]
                        total = int(batch["pages"][i])
                        if len(pages) < total:
                            continue
                        del gathering[path]
                        run.add(EmbeddedDocument(path, str(batch["kind"][i]), str(batch["hash"][i]),
                                                 np.stack([pages[n] for n in range(1, total + 1)])))
                        advance(1, total)
                        finished.add(path)
                        continue
                    finished.add(path)
                    advance(1)
        except Exception as exc:
            cause = unwrap_ray_error(exc)
            if cause is not exc:
                raise cause from None
            raise
    if gathering:  # every page row reached the driver, or Ray raised above; anything else is a bug
        raise RuntimeError(f"pages of {len(gathering)} document(s) went missing in the Ray job: "
                           f"{sorted(gathering)[:3]}")
    return run.finish()
