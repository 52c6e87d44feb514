"""A small load generator for the API: concurrent clients, mixed requests, answers kept for checking.

Used by the load test (tests/test_serve_load.py) and the benchmark (benchmarks/serve_load.py).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

Request = tuple[str, dict[str, Any]]  # (path, JSON body)


def _png_url(seed: int, size: tuple[int, int] = (96, 72)) -> str:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_mix(with_search: bool = True) -> list[Request]:
    """Distinct requests of every kind: texts, images, image+text, Matryoshka, base64, search."""
    texts = ["a dog running on the grass", "two children on a beach", "a man riding a bicycle",
             "a red car parked in the street", "people walking in the snow", "a boat on a lake"]
    images = [_png_url(seed) for seed in range(3)]
    mix: list[Request] = [("/v1/embeddings", {"input": t}) for t in texts]
    mix += [("/v1/embeddings", {"input": [{"type": "image_url", "image_url": {"url": url}}]}) for url in images]
    mix += [
        ("/v1/embeddings", {"input": texts[:2]}),
        ("/v1/embeddings", {"input": [[{"type": "text", "text": "what is in this photo?"},
                                       {"type": "image_url", "image_url": {"url": images[0]}}]]}),
        ("/v1/embeddings", {"input": texts[2], "dimensions": 32, "encoding_format": "base64"}),
        ("/v1/embeddings", {"input": texts[3], "role": "candidate"}),
    ]
    if with_search:
        mix += [("/v1/search", {"query": texts[0], "k": 10}),
                ("/v1/search", {"image": images[1], "k": 10})]
    return mix


QUERIES = ["a dog running on the grass", "two children on a beach", "a man riding a bicycle",
           "a red car parked in the street", "people walking in the snow", "a boat on a lake",
           "a woman holding an umbrella in the rain", "a black dog jumps over a log", "a crowd at a concert",
           "a surfer riding a big wave", "a little girl in a pink dress", "two men playing football",
           "a climber on a rock face", "a brown horse in a field", "an old man sitting on a bench",
           "kids splashing in a fountain"]


def text_mix() -> list[Request]:
    """Sixteen distinct one-text search queries: what a search box sends."""
    return [("/v1/embeddings", {"input": q}) for q in QUERIES]


def image_mix(urls: list[str] | None = None) -> list[Request]:
    """One image per request (``urls``: data: URLs, e.g. of real photos; default 16 synthetic PNGs)."""
    urls = urls or [_png_url(100 + seed) for seed in range(16)]
    return [("/v1/embeddings", {"input": [{"type": "image_url", "image_url": {"url": url}}]}) for url in urls]


def file_data_url(path: str) -> str:
    kind = "png" if str(path).lower().endswith(".png") else "jpeg"
    with open(path, "rb") as fh:
        return f"data:image/{kind};base64," + base64.b64encode(fh.read()).decode()


def post(base: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None,
         conn: http.client.HTTPConnection | None = None) -> tuple[int, Any, float]:
    """(status, JSON answer, seconds)."""
    own = conn is None
    if conn is None:
        parts = urlsplit(base)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    elapsed = time.perf_counter() - started
    if own:
        conn.close()
    return response.status, json.loads(payload) if payload else None, elapsed


@dataclass
class LoadResult:
    requests: int
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    answers: dict[tuple[int, int], tuple[int, Any]] = field(default_factory=dict)  # (client, j) → (mix index, answer)
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": len(self.errors),
                "median_ms": round(statistics.median(self.latencies) * 1000, 1) if self.latencies else None,
                "p95_ms": round(self.percentile(95) * 1000, 1), "seconds": round(self.seconds, 2),
                "requests_per_s": round(self.throughput, 2)}


def run_load(base: str, mix: list[Request], clients: int, per_client: int,
             headers: dict[str, str] | None = None) -> LoadResult:
    """``clients`` threads, each sending ``per_client`` requests back to back (keep-alive)."""
    result = LoadResult(requests=clients * per_client)
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        parts = urlsplit(base)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
        start_line.wait()
        for j in range(per_client):
            which = (c * 7 + j * 3) % len(mix)
            path, body = mix[which]
            try:
                status, answer, elapsed = post(base, path, body, headers, conn)
            except Exception as exc:  # counted, not raised: the load test reports every error
                with lock:
                    result.errors.append(f"client {c} request {j}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
                continue
            with lock:
                result.latencies.append(elapsed)
                if status != 200:
                    result.errors.append(f"client {c} request {j}: HTTP {status} {answer}")
                else:
                    result.answers[(c, j)] = (which, answer)
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result


def vectors_of(answer: dict[str, Any]) -> np.ndarray:
    rows = []
    for item in answer["data"]:
        value = item["embedding"]
        rows.append(np.frombuffer(base64.b64decode(value), dtype="<f4") if isinstance(value, str)
                    else np.asarray(value, dtype=np.float32))
    return np.stack(rows)


def same_answer(path: str, got: Any, reference: Any, atol: float = 1e-4) -> bool:
    """Equal up to float noise; for search, equal scores per page (pages with tied scores may swap)."""
    if path == "/v1/embeddings":
        a, b = vectors_of(got), vectors_of(reference)
        return a.shape == b.shape and bool(np.allclose(a, b, atol=atol))
    ref = {(r["path"], r["page"]): r["score"] for r in reference["results"]}
    hits = got["results"]
    scores = [r["score"] for r in hits]
    return (len(hits) == len(ref) and all(abs(ref.get((r["path"], r["page"]), np.inf) - r["score"]) <= atol
                                          for r in hits)
            and all(x >= y - atol for x, y in zip(scores, scores[1:])))


def deviation(result: LoadResult, mix: list[Request], reference: list[Any]) -> float:
    """The largest absolute difference between an embedding answer and its single-request answer."""
    worst = 0.0
    for which, answer in result.answers.values():
        if mix[which][0] == "/v1/embeddings":
            a, b = vectors_of(answer), vectors_of(reference[which])
            if a.shape == b.shape:
                worst = max(worst, float(np.abs(a - b).max()))
    return worst


def check_answers(result: LoadResult, mix: list[Request], reference: list[Any]) -> list[str]:
    """Every answer equal to the single-request answer for the same request; returns the mismatches."""
    return [f"client {c} request {j} ({mix[which][0]} #{which}) differs from its single-request answer"
            for (c, j), (which, answer) in sorted(result.answers.items())
            if not same_answer(mix[which][0], answer, reference[which])]
