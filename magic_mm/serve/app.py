"""The HTTP API (FastAPI): OpenAI-compatible embeddings, rerank, search, health, and the web page.

Every failure a client can cause is answered with a 4xx and OpenAI's error JSON
(``{"error": {"message", "type", "param", "code"}}``); anything else becomes a plain
500 JSON without a traceback.  The model runs only in the micro-batcher's thread.
"""

from __future__ import annotations

import base64
import hmac
import io
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from magic_mm.errors import UserError
from magic_mm.index.files import page_image
from magic_mm.index.search import (
    RerankerUnavailableError,
    load_reranker,
    reranker_scores,
    retrieve,
    takes_first_stage_scores,
)
from magic_mm.index.store import Hit, PageStore
from magic_mm.model.embedder import MagicEmbedder
from magic_mm.model.inputs import MMInput, PreparedInput
from magic_mm.model.workers import model_worker_pool
from magic_mm.serve.batcher import MicroBatcher, Pass, ServerBusyError, finish, run_in_order
from magic_mm.serve.limits import (
    ApiError,
    ServeSettings,
    content_parts_input,
    embedding_inputs,
    image_from_url,
    prepare_checked,
)

log = logging.getLogger("magic_mm.serve")
THUMBNAIL_SIZE = 256
ROLES = ("query", "candidate")
T = TypeVar("T")


def pass_size(count: int, max_batch: int) -> int:
    """The padded size of a pass of ``count`` inputs: the next power of two, at most ``max_batch``."""
    return min(1 << (count - 1).bit_length(), max_batch)


def pass_sizes(max_batch: int) -> list[int]:
    """Every size ``pass_size`` gives: 1, 2, 4, … and ``max_batch``."""
    return sorted({pass_size(count, max_batch) for count in range(1, max_batch + 1)})


def load_on_own_thread(load: Callable[[], T]) -> T:
    """``load()`` (a model load) run on a thread of its own that then ends.

    torch's OpenMP (libgomp) keeps a team of worker threads for every thread that has run a
    parallel op. Once the teams hold more threads than the CPU has cores, libgomp stops spinning
    between parallel regions, and every parallel op pays a futex wake-up instead: on 2 cores, a
    58 × 576 add took 7.6 µs on a new thread after a load here and 123 µs after a load on the
    main thread, and a one-at-a-time server answered a photo in 225 against 599 ms
    (``benchmarks/openmp_teams.py``). A thread's team ends with the thread, so loading here leaves
    the batcher's thread, which runs every pass and its warm-up, the only team.
    """
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(load())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            done.set_exception(exc)

    thread = threading.Thread(target=run, name="magic-mm-load", daemon=True)  # Ctrl-C need not wait
    thread.start()
    thread.join()  # its team ends with it, before any pass
    return done.result()


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run a little model work off the batcher's thread without forming an OpenMP team there
    (``load_on_own_thread``); the thread's count is put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# What one image worker (one intra-op thread) spends on magic-mm-tiny's passes, in photos: a pass
# about one photo of fixed work (the LM's weights streamed once, the Python around it), a query
# about 0.4 of a photo (40 + 21 ms a query and 60 + 50 ms a photo, measured). Only used to balance
# the workers, so rough is enough.
PASS_COST, QUERY_COST, PHOTO_COST = 1.0, 0.4, 1.0


def photos_beside_texts(texts: int, photos: int, workers: int) -> int:
    """How many of a mixed collection's photos the worker running its text pass also takes (the
    rest are split evenly over the other workers), so that the busiest worker is least busy."""
    def busiest(beside: int) -> float:
        rest = photos - beside
        text_worker = PASS_COST + QUERY_COST * texts + (PASS_COST + PHOTO_COST * beside if beside else 0.0)
        others = PASS_COST + PHOTO_COST * math.ceil(rest / (workers - 1)) if rest else 0.0
        return max(text_worker, others)
    return min(range(photos + 1), key=busiest)


def _outcome(future: Future) -> np.ndarray | Exception:
    try:
        return future.result()
    except Exception as exc:  # handed to the pass's requests
        return exc


class Service:
    """Everything the endpoints share: the model, its batcher, the index, the settings."""

    def __init__(self, embedder: MagicEmbedder, model: str, store: PageStore | None, settings: ServeSettings,
                 reranker_loader: Callable[[str], Any] = load_reranker) -> None:
        self.embedder, self.model, self.store, self.settings = embedder, model, store, settings
        self.reranker_loader = reranker_loader
        self.batcher = MicroBatcher(self._embed_raw, settings.batch, run_passes=self._run_passes)
        self._reranker: Any = None
        self._reranker_error: str | None = None
        self._reranker_lock = threading.RLock()  # the reranker is not the batcher's model; one call at a time
        self._visual_tokens: dict[tuple[tuple[int, int], ...], int] = {}
        self._visual_tokens_lock = threading.Lock()
        self._image_workers = model_worker_pool(embedder.backbone.device, settings.batch.image_workers, "magic-mm-image")
        # On a GPU every pass is padded to a power of two (pass_size): each batch size it has not
        # seen costs first-call work (most likely cuDNN planning every convolution anew). Unpadded,
        # an H200 server answered photos at 13–31 requests/s in its first rounds, then 160–175,
        # and 15 again when a new size came (docs/serving.md).
        self.bucket_passes = embedder.backbone.device.type == "cuda"

    @property
    def image_workers(self) -> int:
        """Model threads an image pass is split over (1: not split)."""
        return self.settings.batch.image_workers if self._image_workers is not None else 1

    def warm_up(self) -> None:
        """One text pass and one split image pass before the first request, so that no client
        waits on first-call work: oneDNN building its kernels, and each model thread measuring
        its products' largest batch-invariant call (``packed_linear.invariant_call_rows``). With
        padded passes (a GPU), a text and an image pass of every size a pass can have."""
        start = time.perf_counter()
        gray = Image.new("RGB", (64, 64), (128, 128, 128))
        if self.bucket_passes:
            text_sizes = image_sizes = pass_sizes(self.settings.batch.max_batch)
        else:
            text_sizes, image_sizes = [1], [2]  # two photos: one per image worker
        for size in text_sizes:
            self._embed_raw(self.embedder.prepare(["warm-up"] * size), [("query", None)] * size)
        for size in image_sizes:
            self._embed_raw(self.embedder.prepare([gray] * size), [("candidate", None)] * size)
        log.info("warm-up passes took %.1f s", time.perf_counter() - start)

    def close(self) -> None:
        """Stop the image workers; later passes run unsplit on the calling thread."""
        pool, self._image_workers = self._image_workers, None
        if pool is not None:
            pool.shutdown()

    def _embed_raw(self, items: list[PreparedInput], prompts: list[tuple[str, str | None]]) -> np.ndarray:
        """Raw vectors of ``items``, each under its own (role, instruction) prompt.

        A pass of two or more images is split over the image workers when there are any
        (``BatchSettings.image_workers``); everything else runs here, in batches of max_batch."""
        pool = self._image_workers
        if pool is None or len(items) < 2 or any(item.image is None for item in items):
            return self._embed_in_batches(items, prompts)
        parts = np.array_split(np.arange(len(items)), min(self.image_workers, len(items)))
        futures = [self._submit_part(pool, items, prompts, part) for part in parts]
        return np.concatenate([future.result() for future in futures])

    def _submit_part(self, pool: ThreadPoolExecutor, items: list[PreparedInput],
                     prompts: list[tuple[str, str | None]], part: np.ndarray) -> Future:
        """The inputs at the indices ``part``, as one pass on an image worker."""
        return pool.submit(self._embed_in_batches, [items[i] for i in part], [prompts[i] for i in part])

    def _run_passes(self, passes: list[Pass]) -> Iterator[tuple[int, np.ndarray | Exception]]:
        """A collection's passes (the batcher's ``PassRunner``). With image workers, a text pass and
        an image pass run side by side: the text pass on one worker (one intra-op thread), the
        photos split over the others, and as many beside the text pass as keeps the workers even
        (``photos_beside_texts``). A collection of 7 queries and 3 photos took 296 against 368 ms
        one pass after the other (15 interleaved rounds). Otherwise the passes run in turn, an image
        pass split over the workers (``_embed_raw``)."""
        pool = self._image_workers
        kinds = [any(item.image is not None for item in items) for items, _ in passes]
        if pool is None or kinds != [False, True]:
            yield from run_in_order(self._embed_raw)(passes)
            return
        (texts, text_prompts), (photos, photo_prompts) = passes
        beside = photos_beside_texts(len(texts), len(photos), self.image_workers)
        text_pass = pool.submit(self._embed_in_batches, texts, text_prompts)
        parts = [part for part in np.array_split(np.arange(beside, len(photos)), self.image_workers - 1) if len(part)]
        if beside:  # submitted last: the first worker to be free takes it, normally the text pass's
            parts.append(np.arange(beside))
        photo_passes = [(part[0], self._submit_part(pool, photos, photo_prompts, part)) for part in parts]
        yield 0, _outcome(text_pass)
        outcomes = [_outcome(future) for _, future in sorted(photo_passes, key=lambda p: p[0])]
        failure = next((o for o in outcomes if isinstance(o, Exception)), None)
        yield 1, failure if failure is not None else np.concatenate(outcomes)

    def _embed_in_batches(self, items: list[PreparedInput], prompts: list[tuple[str, str | None]]) -> np.ndarray:
        """``MagicEmbedder.embed_prepared`` with a role and instruction per input instead of per call, so the
        batcher can put queries and candidates in the same forward pass; the load test and the
        round-trip test check that the vectors equal ``MagicEmbedder.encode``'s."""
        embedder, step = self.embedder, self.settings.batch.max_batch
        out = []
        for start in range(0, len(items), step):
            # Consecutive inputs of one request share their role and instruction: one prompts() call each.
            runs = itertools.groupby(zip(items[start : start + step], prompts[start : start + step]),
                                     key=lambda pair: pair[1])
            lm_prompts = [p for (role, instruction), run in runs
                          for p in embedder.prompts([item for item, _ in run], role, instruction)]
            count = len(lm_prompts)
            if self.bucket_passes:  # the last prompt repeated; its extra rows are dropped below
                lm_prompts += lm_prompts[-1:] * (pass_size(count, step) - count)
            with torch.inference_mode():
                pooled = embedder.embed_prompts(lm_prompts)
            out.append(pooled[:count].float().cpu().numpy())
        return np.concatenate(out)

    def parse_inputs(self, raw: Any) -> list[PreparedInput]:
        """``input`` → prepared inputs, images decoded and (where the backbone does that ahead) resized.
        Run on a worker thread when there are images, so decoding never stalls the event loop."""
        items = embedding_inputs(raw, self.settings)
        return [self.ready(item) for item in items]

    def ready(self, item: PreparedInput) -> PreparedInput:
        """The backbone's thread-safe image preparation (a resize for magic-mm-tiny), done here rather
        than in the batcher's thread; it does not change the vectors."""
        if item.image is None:
            return item
        return PreparedInput(text=item.text, image=self.embedder.backbone.prepare_image(item.image), name=item.name)

    def reranker(self) -> Any:
        """The reranker, loaded once; ``RerankerUnavailableError`` if this magic-mm has none."""
        with self._reranker_lock:
            if self._reranker is None and self._reranker_error is None:
                try:
                    with one_intra_op_thread():  # a request thread: see rerank_scores
                        self._reranker = self.reranker_loader(self.model)
                except RerankerUnavailableError as exc:
                    self._reranker_error = str(exc)
            if self._reranker is None:
                raise RerankerUnavailableError(self._reranker_error or "reranker not available")
            return self._reranker

    def rerank_scores(self, query: MMInput, candidates: list[MMInput],
                      first_stage_scores: list[float] | None = None) -> list[float]:
        reranker = self.reranker()
        # One intra-op thread: a second OpenMP team, on this request thread, would make every
        # later pass of the batcher pay a futex wake-up per op (``load_on_own_thread``).
        with self._reranker_lock, one_intra_op_thread():
            return reranker_scores(reranker, query, candidates, first_stage_scores)

    def search(self, vector: np.ndarray, k: int, query: PreparedInput, rerank: bool, exact: bool) -> list[Hit]:
        """Index search (blocking; run in a worker thread), reranked under the reranker's lock."""
        assert self.store is not None
        if not rerank:
            return retrieve(self.store, vector, k, exact=exact)
        reranker = self.reranker()
        with self._reranker_lock, one_intra_op_thread():  # as in rerank_scores
            return retrieve(self.store, vector, k, MMInput(text=query.text, image=query.image, name="query"),
                            reranker, self.settings.rerank_top, exact)

    def tokens(self, items: list[PreparedInput]) -> int:
        """Usage: text tokens plus visual tokens (after compression) of every input."""
        backbone = self.embedder.backbone
        total = 0
        for item in items:
            if item.text:
                total += len(backbone.tokenizer(item.text, add_special_tokens=False)["input_ids"])
            if item.image is not None:
                total += self.visual_tokens(*item.image.size)
        return total

    def visual_tokens(self, width: int, height: int) -> int:
        """Visual tokens of an image this size, remembered per tile layout.

        The backbone finds a tile's grid by running the vision encoder; done per request,
        on the event loop, that cost as much as embedding the image and stalled every other
        request meanwhile.  The layout (the tile sizes) fixes the count, and there are few."""
        layout = tuple(self.embedder.backbone.tiles_for_size(width, height))
        count = self._visual_tokens.get(layout)
        if count is None:
            with self._visual_tokens_lock:
                count = self._visual_tokens.get(layout)
                if count is None:
                    with one_intra_op_thread():  # on the event loop: no OpenMP team beside the batcher's
                        count = int(self.embedder.backbone.visual_tokens(width, height))
                    self._visual_tokens[layout] = count
        return count


def create_app(embedder: MagicEmbedder, model: str, store: PageStore | None = None,
               settings: ServeSettings | None = None,
               reranker_loader: Callable[[str], Any] = load_reranker) -> FastAPI:
    """The app; ``reranker_loader`` exists so tests can stand in for ``MagicReranker``."""
    settings = replace(settings or ServeSettings(), decode_size=embedder.backbone.decode_size)
    service = Service(embedder, model, store, settings, reranker_loader)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        service.batcher.start(first=service.warm_up)  # warmed on the thread that runs the passes
        yield
        service.batcher.stop()
        service.close()

    app = FastAPI(title="magic-mm", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(Guard, settings=settings)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok", "model": model, "dim": embedder.embedding_dim, "compression": str(embedder.compression),
            **embedder.placement,
            "index": None if store is None else {"db": str(store.db_path), "rows": store.count()},
            "auth": settings.api_key is not None,
            "batching": {"max_batch": settings.batch.max_batch, "max_wait_ms": settings.batch.max_wait_ms,
                         "max_queue": settings.batch.max_queue,
                         "image_workers": service.image_workers},
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return (files("magic_mm.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = await json_body(request)
        check_model(body, service)
        dim = optional_int(body, "dimensions", 1, embedder.embedding_dim)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"encoding_format: {encoding!r} is not supported; use \"float\" or \"base64\"",
                           "encoding_format")
        role = body.get("role", "query")
        if role not in ROLES:
            raise ApiError(400, f"role: {role!r}; use \"query\" or \"candidate\"", "role")
        instruction = body.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise ApiError(400, "instruction: expected a string", "instruction")
        if "input" not in body:
            raise ApiError(400, "input: missing; send a string, a list of strings or a list of content-part lists",
                           "input")
        raw = body["input"]
        if isinstance(raw, str) or (isinstance(raw, list) and all(isinstance(x, str) for x in raw)):
            items = embedding_inputs(raw, settings)  # texts only: quick, stay on the event loop
        else:
            items = await run_in_threadpool(service.parse_inputs, raw)
        tokens = service.tokens(items)
        vectors = finish(await service.batcher.embed(items, role, instruction), dim)
        data = [{"object": "embedding", "index": i,
                 "embedding": encode_vector(v, encoding)} for i, v in enumerate(vectors)]
        # A ready JSONResponse: FastAPI would otherwise walk every float through jsonable_encoder.
        return JSONResponse({"object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        check_model(body, service)
        query = rerank_item(body.get("query"), "query", settings)
        documents = body.get("documents")
        if not isinstance(documents, list) or not documents:
            raise ApiError(400, "documents: expected a non-empty list of strings or {\"text\"|\"image\"} objects",
                           "documents")
        if len(documents) > settings.max_inputs:
            raise ApiError(413, f"documents: {len(documents)} is more than the limit of {settings.max_inputs}",
                           "documents", "too_many_inputs")
        def parse_documents() -> list[PreparedInput]:
            return [rerank_item(d, f"documents[{i}]", settings) for i, d in enumerate(documents)]

        # documents with images are decoded on a worker thread, as in /v1/embeddings
        docs = parse_documents() if all(isinstance(d, str) for d in documents) else await run_in_threadpool(
            parse_documents)
        top_n = optional_int(body, "top_n", 1, len(docs)) or len(docs)
        return_documents = body.get("return_documents", True)

        async def cosines() -> list[float]:  # the service's embedder, through its batcher
            q = finish(await service.batcher.embed([query], "query"))[0]
            c = finish(await service.batcher.embed(docs, "candidate"))
            return [float(s) for s in c @ q]

        try:
            reranker = await run_in_threadpool(service.reranker)
            # A FusionReranker fuses first-stage scores; a request brings none, so the served
            # embedder's cosine is the first stage.
            first_stage = await cosines() if takes_first_stage_scores(reranker) else None
            scores = await run_in_threadpool(service.rerank_scores, query, docs, first_stage)
            scorer = "reranker"
        except RerankerUnavailableError:
            # No trained reranker in this magic-mm yet: score with the embedder (cosine), and say so.
            scores = await cosines()
            scorer = "embedding-cosine"
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:top_n]
        results = []
        for i in order:
            entry: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if return_documents:
                entry["document"] = {"text": docs[i].text} if docs[i].text else None
            results.append(entry)
        tokens = service.tokens([query, *docs])
        return {"model": model, "scorer": scorer, "results": results,
                "usage": {"total_tokens": tokens, "prompt_tokens": tokens}}

    @app.post("/v1/search")
    async def search(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        if store is None:
            raise ApiError(400, "this server has no index; start it with --db PATH to use /v1/search", None,
                           "no_index")
        text = body.get("query")
        if text is not None and not isinstance(text, str):
            raise ApiError(400, "query: expected a string", "query")
        image = body.get("image")
        picture = await run_in_threadpool(image_from_url, image, "image", settings) if image else None
        if not (text and text.strip()) and picture is None:
            raise ApiError(400, "empty search: send a \"query\" text, an \"image\" (data: URL), or both", "query")
        query = prepare_checked(MMInput(text=text if text and text.strip() else None, image=picture, name="query"))
        k = optional_int(body, "k", 1, settings.max_k) or 10
        rerank, exact = bool_field(body, "rerank"), bool_field(body, "exact")
        if rerank:
            try:  # refuse before embedding anything
                await run_in_threadpool(service.reranker)
            except RerankerUnavailableError as exc:
                raise ApiError(400, str(exc), "rerank", "rerank_unavailable") from None
        vector = finish(await service.batcher.embed([query], "query"))[0]
        hits = await run_in_threadpool(service.search, vector, k, query, rerank, exact)
        results = [hit.to_dict() for hit in hits]
        if bool_field(body, "thumbnails"):
            thumbs = await run_in_threadpool(lambda: [thumbnail(h) for h in hits])
            for result, thumb in zip(results, thumbs):
                result["thumbnail"] = thumb
        return {"object": "search.results", "model": model, "reranked": rerank, "results": results}

    return app


# -- request helpers ----------------------------------------------------------------

async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None
    except RecursionError:  # the decoder recurses once per nesting level; it stops cleanly at the limit
        raise ApiError(400, "the request body nests JSON arrays or objects too deeply (hundreds of levels); no "
                            "field of this API nests more than 4 levels, so send a flatter body", None,
                       "json_too_deep") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


def check_model(body: dict[str, Any], service: Service) -> None:
    name = body.get("model")
    served = {service.model, service.embedder.config.name, "magic-mm"}
    if name is not None and name not in served:
        raise ApiError(400, f"model: {name!r} is not served here; this server serves {service.model!r}", "model",
                       "model_not_found")


def optional_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{name}: {value!r} is out of range; use an integer from {low} to {high}", name)
    return value


def bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}: expected true or false", name)
    return value


def rerank_item(value: Any, param: str, settings: ServeSettings) -> PreparedInput:
    """A query or document: a string, ``{"text": …}``, ``{"image": url}`` or both, or content parts."""
    if isinstance(value, str):
        if not value.strip():
            raise ApiError(400, f"{param}: the text is empty", param)
        return prepare_checked(MMInput(text=value, name=param))
    if isinstance(value, list):
        return prepare_checked(content_parts_input(value, param, settings))
    if isinstance(value, dict) and ("text" in value or "image" in value):
        text = value.get("text")
        if text is not None and not isinstance(text, str):
            raise ApiError(400, f"{param}.text: expected a string", param)
        image = image_from_url(value["image"], f"{param}.image", settings) if value.get("image") else None
        if image is None and not (text and text.strip()):
            raise ApiError(400, f"{param}: has neither a text nor an image", param)
        return prepare_checked(MMInput(text=text if text and text.strip() else None, image=image, name=param))
    raise ApiError(400, f"{param}: expected a string or an object with \"text\" and/or \"image\"", param)


def encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # OpenAI's format: little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


def thumbnail(hit: Hit) -> str | None:
    try:
        image = page_image(Path(hit.path), hit.kind, hit.page)
    except (UserError, OSError):
        return None  # the file changed or went away since it was indexed
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# -- errors, auth and size limits ------------------------------------------------------

def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(UserError)
    async def user_error(_: Request, exc: UserError) -> JSONResponse:
        return error_response(ApiError(400, str(exc)))

    @app.exception_handler(ServerBusyError)
    async def busy(_: Request, exc: ServerBusyError) -> JSONResponse:
        return error_response(ApiError(503, str(exc), None, "server_busy"))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(ApiError(400, f"{where}: {first.get('msg', 'invalid request')}", where))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"{request.url.path}: no such endpoint; see GET / and the README",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(ApiError(exc.status_code, message, None, "not_found" if exc.status_code == 404
                                       else "invalid_request"))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(ApiError(500, "internal server error", None, "internal_error"))


class Guard:
    """ASGI middleware: the bearer-token check on /v1/* and the request-body size cap."""

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        key = self.settings.api_key
        if key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                problem = "no API key" if not given else "a wrong API key"
                return await self._reply(send, ApiError(
                    401, f"{problem}: send the header 'Authorization: Bearer <key>' with this server's API key",
                    None, "invalid_api_key"))
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._reply(send, ApiError(400, "Content-Length header is not a number"))
            if int(declared) > limit:
                return await self._reply(send, body_too_large(int(declared), limit))
        chunks, size = [], 0
        while True:  # read the body here, so a chunked upload cannot exceed the cap either
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._reply(send, body_too_large(size, limit))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _reply(send: Any, error: ApiError) -> None:
        response = error_response(error)
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def body_too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body ({size:,}+ bytes) is larger than the limit of {limit:,} bytes; send "
                         "smaller images or fewer inputs", None, "body_too_large")
