"""``magic-mm index`` and ``magic-mm search`` (registered on the main app by ``register``)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from magic_mm.cli_options import DeviceOpt, DtypeOpt, load_embedder
from magic_mm.errors import UserError

out = Console()
err = Console(stderr=True)

DEFAULT_DB = "magic.lance"
# A str, not a Path: an object-store URI (s3://bucket/magic.lance) must keep its "//".
DbOpt = Annotated[str, typer.Option("--db", help="LanceDB folder holding the index (or an object-store URI "
                                               "LanceDB accepts, e.g. s3://bucket/magic.lance).")]
ENGINES = ("local", "ray")
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Model; default: the one the index was built with (new index: magic-mm-tiny).")]
CompressionOpt = Annotated[str | None, typer.Option(help="Override compression (must match the index).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def model_for(db: str, model: str | None) -> str:
    """``--model`` if given, else the model that built ``db``, else the default."""
    if model is not None:
        return model
    from magic_mm.index.store import PageStore

    try:
        return PageStore.open(db).stamp.model
    except UserError:
        return "magic-mm-tiny"


def index(
    paths: Annotated[list[Path], typer.Argument(help="Image files, PDF files or folders (searched recursively).")],
    db: DbOpt = DEFAULT_DB,
    model: ModelOpt = None,
    compression: CompressionOpt = None,
    prune: Annotated[bool, typer.Option(help="Remove rows of files under PATHS that no longer exist.")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Index at most this many files (sorted by path).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Pages per forward pass and per commit.")] = 16,
    ann: Annotated[str | None, typer.Option(help="Then build an ANN index: ivf-pq or hnsw (for >100k rows).")] = None,
    rebuild: Annotated[bool, typer.Option(help="Drop the index's rows first and re-embed everything.")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    engine: Annotated[str, typer.Option(help="local: this process; ray: a Ray cluster (pip install "
                                             "'magic-mm[ray]'; see docs/bulk.md).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="--engine ray: auto or ray://HOST:10001 for a cluster; "
                                                         "default: start a local Ray.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="--engine ray: model replicas (default: one per "
                                                            "GPU, or 1 without GPUs).")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(min=0, help="--engine ray: GPUs per replica (default: "
                                                                      "1 where there are GPUs, else 0).")] = None,
    cpus_per_worker: Annotated[float, typer.Option(min=0.01, help="--engine ray: CPUs (torch threads) per "
                                                                  "replica.")] = 1.0,
    image_workers: Annotated[int | None, typer.Option(min=1, help="--engine local, on a CPU: batches embedded "
                                                                  "side by side, each on its share of the torch "
                                                                  "threads (default 2; 1: one at a time on all).")] = None,
) -> None:
    """Embed images and PDF pages under PATHS into a LanceDB index, incrementally.

    Unchanged files (same content hash) are skipped, changed ones replaced; a killed
    run can simply be started again.  --engine ray spreads the work over a Ray cluster
    (docs/bulk.md); both engines build the same index.
    """
    from magic_mm.index.indexer import index_paths
    from magic_mm.index.store import ANN_ADVICE_ROWS, ANN_KINDS, ModelStamp, PageStore

    if ann is not None and ann not in ANN_KINDS:
        raise UserError(f"--ann {ann!r}: choose one of {', '.join(ANN_KINDS)}")
    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "local" and (ray_address, workers, gpus_per_worker) != (None, None, None):
        raise UserError("--ray-address, --workers and --gpus-per-worker go with --engine ray; add --engine ray")
    if engine == "ray" and image_workers is not None:
        raise UserError("--image-workers goes with --engine local; with --engine ray use --workers and "
                        "--cpus-per-worker")
    if engine == "ray" and device != "auto":
        raise UserError(f"--device {device} goes with --engine local; with --engine ray each replica runs on "
                        "the GPUs Ray gives it (--gpus-per-worker)")
    model = model_for(db, model)
    if engine == "ray":
        summary, stamp, note = _index_on_ray(
            paths, db, model, compression, dtype, prune=prune, batch_size=batch_size, limit=limit,
            rebuild=rebuild, quiet=quiet or as_json, address=ray_address, workers=workers,
            gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
        store = PageStore.open(db)
    else:
        embedder = load_embedder(model, compression, quiet or as_json, dtype, device)
        stamp = ModelStamp.of(embedder, model)
        store = PageStore.open_or_create(db, stamp, rebuild=rebuild)
        note = store.stamp.dtype_note(stamp)
        if note and not as_json:
            err.print(note, highlight=False, soft_wrap=True)
        summary = index_paths(embedder, store, paths, prune=prune, batch_size=batch_size, limit=limit,
                              show_progress=not (quiet or as_json), workers=image_workers)
    if ann is not None:
        with err.status(f"building {ann} index …"):
            store.build_ann(ann)
    result = {"db": str(db), "model": model, "dtype": stamp.dtype, "engine": engine, **summary.to_dict(),
              "ann": ann, **({"dtype_note": note} if note else {})}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    counts = summary.counts()
    out.print(f"indexed into {db} with {model}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
              + f"; {summary.pages_embedded} pages embedded; {summary.rows} rows in the index")
    for failure in summary.failed:
        err.print(f"[yellow]failed[/] {failure['reason']}", highlight=False, soft_wrap=True)
    if summary.missing:
        err.print(f"{len(summary.missing)} indexed file(s) no longer exist; pass --prune to remove them")
    if summary.rows > ANN_ADVICE_ROWS and ann is None:
        err.print(f"{summary.rows:,} rows: exact search is getting slow; add an ANN index with --ann ivf-pq")


def _index_on_ray(paths: list[Path], db: str, model: str, compression: str | None, dtype: str, *, prune: bool,
                  batch_size: int, limit: int | None, rebuild: bool, quiet: bool, address: str | None,
                  workers: int | None, gpus_per_worker: float | None, cpus_per_worker: float) -> tuple:
    """``index --engine ray``: connect to Ray, stamp the index with the model the workers load, run the job."""
    from magic_mm.bulk import require_ray

    ray = require_ray("--engine ray")  # before anything slow
    # Ray's own notices (a worker that died and is being replaced, say) are printed on stdout; they
    # go to stderr here, so that stdout holds only the summary (--json).
    with contextlib.redirect_stdout(sys.stderr):
        return _run_on_ray(ray, paths, db, model, compression, dtype, prune=prune, batch_size=batch_size,
                           limit=limit, rebuild=rebuild, quiet=quiet, address=address, workers=workers,
                           gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)


def _run_on_ray(ray: Any, paths: list[Path], db: str, model: str, compression: str | None, dtype: str, *,
                prune: bool, batch_size: int, limit: int | None, rebuild: bool, quiet: bool, address: str | None,
                workers: int | None, gpus_per_worker: float | None, cpus_per_worker: float) -> tuple:
    from magic_mm.bulk import resolve_worker_dtype, start_ray, worker_resources
    from magic_mm.index.ray_engine import index_paths_ray
    from magic_mm.index.store import ModelStamp, PageStore

    started = start_ray(address, workers or 1, cpus_per_worker)
    try:
        resources = worker_resources(workers, gpus_per_worker, cpus_per_worker)
        run_dtype = resolve_worker_dtype(dtype, resources)
        # The driver loads the model once, on its CPU, in the workers' dtype: for the index's stamp
        # (its fingerprint hashes the weights) and to fail early on a bad --model.
        embedder = load_embedder(model, compression, quiet, run_dtype)
        stamp = ModelStamp.of(embedder, model)
        store = PageStore.open_or_create(db, stamp, rebuild=rebuild)
        note = store.stamp.dtype_note(stamp)
        if note and not quiet:
            err.print(note, highlight=False, soft_wrap=True)
        summary = index_paths_ray(model, store, paths, resources, run_dtype, compression=compression,
                                  max_pixels=embedder.max_image_pixels, decode_size=embedder.backbone.decode_size,
                                  prune=prune, batch_size=batch_size,
                                  limit=limit, show_progress=not quiet)
    finally:
        if started:
            ray.shutdown()
    return summary, stamp, note


def search(
    text: Annotated[str | None, typer.Argument(help="Search text (optional with --image).")] = None,
    image: Annotated[Path | None, typer.Option("--image", "-i", help="Query image (optional with TEXT).")] = None,
    db: DbOpt = DEFAULT_DB,
    k: Annotated[int, typer.Option("--k", "-k", min=1, max=1000, help="Results to show.")] = 10,
    rerank: Annotated[bool, typer.Option(
        help="Rescore the top candidates with the model's reranker (magic-mm-tiny's: FusionReranker).")] = False,
    rerank_top: Annotated[int, typer.Option(min=1, help="Candidates the reranker rescores.")] = 10,
    exact: Annotated[bool, typer.Option(help="Exact search even if an ANN index exists.")] = False,
    model: ModelOpt = None,
    compression: CompressionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Search the index with a text, an image, or both; shows rank, score, path and page."""
    from magic_mm.index.search import check_same_model, embed_query, load_reranker, query_input, retrieve
    from magic_mm.index.store import PageStore

    query = query_input(text, image)
    store = PageStore.open(db)
    model = model or store.stamp.model
    reranker = load_reranker(model, device=device) if rerank else None  # fail before the slow part
    embedder = load_embedder(model, compression, as_json, dtype, device)
    note = check_same_model(store, embedder, model)
    if note:
        err.print(note, highlight=False, soft_wrap=True)
    hits = retrieve(store, embed_query(embedder, query), k, query=query, reranker=reranker,
                    rerank_top=rerank_top, exact=exact)
    if as_json:
        print(json.dumps({"query": {"text": query.text, "image": str(image) if image else None},
                          "reranked": rerank, "results": [h.to_dict() for h in hits]}, indent=2))
        return
    title = " + ".join(part for part in (f"“{query.text}”" if query.text else "",
                                         f"image {image}" if image else "") if part)
    paths = [short_path(h.path) for h in hits]
    # Results usually share a folder: name it once, so the rows fit a terminal.
    folder = os.path.dirname(paths[0]) if len(paths) > 1 and len({os.path.dirname(p) for p in paths}) == 1 else ""
    out.print(f"{title}{'  (reranked)' if rerank else ''}" + (f"  · in {folder}/" if folder else ""),
              highlight=False, soft_wrap=True)
    table = Table()
    for column, justify in (("rank", "right"), ("score", "right"), ("path", "left"), ("page", "right")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for hit, path in zip(hits, paths):
        page = f"{hit.page}/{hit.pages}" if hit.kind == "pdf" else "-"
        table.add_row(str(hit.rank), f"{hit.score:.4f}", os.path.basename(path) if folder else path, page)
    out.print(table)


def short_path(path: str) -> str:
    """The path relative to the working folder when that is shorter (JSON output keeps it absolute)."""
    relative = os.path.relpath(path)
    return relative if len(relative) < len(path) else path


def register(app: typer.Typer) -> None:
    app.command()(index)
    app.command()(search)
