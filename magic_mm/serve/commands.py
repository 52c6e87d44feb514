"""``magic-mm serve`` (and, through ``register``, the index layer's ``index`` and ``search``)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from magic_mm.cli_options import DeviceOpt, DtypeOpt, load_embedder
from magic_mm.errors import UserError
from magic_mm.index import commands as index_commands

err = Console(stderr=True)
API_KEY_ENV = "MAGIC_MM_API_KEY"


def serve(
    db: Annotated[Path | None, typer.Option("--db", help="Index to search (optional: embeddings work without).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; keep 127.0.0.1 unless you set --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    model: index_commands.ModelOpt = None,
    compression: index_commands.CompressionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    api_key: Annotated[str | None, typer.Option(
        help=f"Require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set).")] = None,
    allow_remote_images: Annotated[bool, typer.Option(help="Let clients send http(s) image URLs for the server to fetch.")] = False,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body.")] = 16.0,
    max_image_mb: Annotated[float, typer.Option(min=0.001, help="Largest image (decoded bytes).")] = 8.0,
    max_image_pixels: Annotated[int, typer.Option(min=1, help="Largest image in pixels (width × height).")] = 16_000_000,
    max_inputs: Annotated[int, typer.Option(min=1, help="Inputs per embeddings call, documents per rerank call.")] = 128,
    max_batch: Annotated[int, typer.Option(min=1, help="Inputs per micro-batched forward pass.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a request waits, from its arrival, for others to batch with.")] = 10.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests before new ones get 503.")] = 256,
    image_workers: Annotated[int, typer.Option(
        min=1, help="On a CPU, split each image pass over this many model threads, and run a text "
                  "pass beside the images (1: one pass at a time).")] = 2,
) -> None:
    """Serve the OpenAI-compatible API (/v1/embeddings, /v1/rerank, /v1/search) and the web page (/)."""
    from magic_mm.index.search import check_same_model, load_reranker
    from magic_mm.index.store import PageStore
    from magic_mm.serve.app import create_app, load_on_own_thread
    from magic_mm.serve.batcher import BatchSettings
    from magic_mm.serve.limits import ServeSettings
    from magic_mm.serve.runner import serve_forever

    store = PageStore.open(db) if db is not None else None
    model = model or (store.stamp.model if store is not None else "magic-mm-tiny")
    embedder = load_on_own_thread(lambda: load_embedder(model, compression, dtype=dtype, device=device))
    if store is not None:
        note = check_same_model(store, embedder, model)
        if note:
            err.print(note, highlight=False, soft_wrap=True)
    key = api_key or os.environ.get(API_KEY_ENV) or None
    if host not in ("127.0.0.1", "localhost", "::1") and key is None:
        err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach it can use it")
    settings = ServeSettings(
        api_key=key, max_body_bytes=int(max_body_mb * 2**20), max_image_bytes=int(max_image_mb * 2**20),
        max_image_pixels=max_image_pixels, max_inputs=max_inputs, allow_remote_images=allow_remote_images,
        batch=BatchSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                            image_workers=image_workers))
    if max_image_mb > max_body_mb:
        raise UserError("--max-image-mb is larger than --max-body-mb; an image that size could never arrive")
    err.print(f"magic-mm serving {model} on http://{host}:{port} (web page at /, API under /v1/)")
    rerankers_on_device = functools.partial(load_reranker, device=device)
    serve_forever(create_app(embedder, model, store, settings, rerankers_on_device), host, port)


def register(app: typer.Typer) -> None:
    index_commands.register(app)
    app.command()(serve)
