"""Shared by the server tests: a small index, data: URLs, and a plain JSON client for 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from conftest import make_image
from PIL import Image

from magic_mm.index.indexer import index_paths
from magic_mm.index.store import ModelStamp, PageStore

MODEL = "tiny-random-composed"


def build_index(embedder: Any, folder: Path) -> PageStore:
    """Four photos and a two-page PDF, indexed with the tiny model (6 rows)."""
    docs = folder / "docs"
    docs.mkdir(parents=True)
    for i in range(4):
        make_image(64, 48, seed=10 + i).save(docs / f"photo_{i}.png")
    pages = [make_image(60, 80, seed=20 + i) for i in range(2)]
    pages[0].save(docs / "paper.pdf", "PDF", save_all=True, append_images=pages[1:])
    store = PageStore.open_or_create(folder / "db.lance", ModelStamp.of(embedder, MODEL))
    index_paths(embedder, store, [docs])
    return store


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def request(base: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            raw: bytes | None = None) -> tuple[int, Any]:
    """One HTTP request to the test server; returns (status, parsed JSON body)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else None


def post(base: str, path: str, body: Any, **kwargs: Any) -> tuple[int, Any]:
    return request(base, "POST", path, body, **kwargs)
