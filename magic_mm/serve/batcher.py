"""Micro-batching: requests that wait at the same time are embedded in one forward pass.

Requests put a job on a bounded queue (full queue → ``ServerBusyError``, answered 503).
One worker thread owns the model: it takes the first waiting job, then keeps taking
jobs until it has ``max_batch`` inputs or the first job has waited ``max_wait_ms`` since it
arrived (taking whatever is queued by then), and runs them together: one forward pass for
the texts and one for the image inputs (a short text padded to an image prompt's length
would cost as much as the image); each input keeps its own prompt role and instruction
(``PassRunner`` says how the passes run). The model returns raw vectors; each request
truncates (``dimensions``) and normalises its own rows, so an answer does not depend on which
other requests shared its batch.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from magic_mm.model.inputs import PreparedInput

Prompt = tuple[str, "str | None"]  # (role, instruction) of one input
EmbedFn = Callable[[list[PreparedInput], list[Prompt]], np.ndarray]  # raw vectors, one row per input
Pass = tuple[list[PreparedInput], list[Prompt]]  # one forward pass: its inputs and their prompts
# Runs a collection's passes (texts first, then images) and yields (pass index, its raw vectors or
# the exception it raised) as each finishes.
PassRunner = Callable[[list[Pass]], Iterator[tuple[int, "np.ndarray | Exception"]]]


def run_in_order(embed: EmbedFn) -> PassRunner:
    """The plain ``PassRunner``: one pass after the other, on the calling thread."""
    def run(passes: list[Pass]) -> Iterator[tuple[int, np.ndarray | Exception]]:
        for index, (items, prompts) in enumerate(passes):
            try:
                yield index, embed(items, prompts)
            except Exception as exc:  # handed to the pass's requests, which answer with an error
                yield index, exc
    return run


@dataclass
class BatchSettings:
    max_batch: int = 32  # inputs per forward pass
    max_wait_ms: float = 10.0  # how long a request waits for company, from its arrival
    max_queue: int = 256  # waiting requests; beyond this, new ones are refused (503)
    timeout_s: float = 120.0  # a request gives up waiting for its vectors after this
    # On a CPU, an image pass is split over this many model threads, each with its share of the
    # intra-op threads (1: one pass on all of them). A convolution's work grows with the batch,
    # so image batches fill cores better side by side than split inside each operator.
    image_workers: int = 2


class ServerBusyError(Exception):
    """The queue is full, or a request waited longer than ``timeout_s``."""


@dataclass
class _Job:
    items: list[PreparedInput]
    role: str
    instruction: str | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    batches: int = 0
    inputs: int = 0
    requests: int = 0
    sizes: list[int] = field(default_factory=list)  # inputs per forward pass
    collections: int = 0  # times the worker took jobs off the queue
    collected: list[int] = field(default_factory=list)  # requests taken each time


class MicroBatcher:
    def __init__(self, embed: EmbedFn, settings: BatchSettings | None = None,
                 run_passes: PassRunner | None = None) -> None:
        """``run_passes``: how a collection's passes run (default ``run_in_order(embed)``); the
        server's runs a mixed collection's text and image passes side by side."""
        self.run_passes = run_passes or run_in_order(embed)
        self.settings = settings or BatchSettings()
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=self.settings.max_queue)
        self._thread: threading.Thread | None = None

    def start(self, first: Callable[[], None] | None = None) -> None:
        """Start the worker thread; ``first`` (a warm-up pass) runs on it before any request, and
        this returns once it has (raising what it raised). The passes' parallel work then stays on
        one thread: see ``magic_mm.serve.app.load_on_own_thread`` for why that matters."""
        if self._thread is None:
            done: Future[None] = Future()

            def run() -> None:
                try:
                    if first is not None:
                        first()
                except BaseException as exc:  # noqa: BLE001 - handed to start's caller
                    done.set_exception(exc)
                    return
                done.set_result(None)
                self._run()

            self._thread = threading.Thread(target=run, name="magic-mm-batcher", daemon=True)
            self._thread.start()
            try:
                done.result()
            except BaseException:
                self._thread = None
                raise

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    async def embed(self, items: list[PreparedInput], role: str, instruction: str | None = None) -> np.ndarray:
        """Raw (un-normalised, full-dimension) vectors for ``items``, computed with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        job = _Job(items, role, instruction, loop.create_future(), loop)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ServerBusyError(
                f"the server is busy ({self.settings.max_queue} requests waiting); retry shortly") from None
        try:
            return await asyncio.wait_for(job.future, self.settings.timeout_s)
        except asyncio.TimeoutError:
            raise ServerBusyError(f"no answer within {self.settings.timeout_s:.0f} s; the server is overloaded") from None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, count = [first], len(first.items)
            # A request waits at most max_wait_ms for company, counted from its arrival: one that
            # queued during the previous pass has waited already, and the clients that pass just
            # answered are 35 ms or more from sending again. What is queued is still taken.
            deadline = first.arrived + self.settings.max_wait_ms / 1000
            stopping = False
            while count < self.settings.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
                count += len(job.items)
            self._process(jobs)
            if stopping:
                return

    def _process(self, jobs: list[_Job]) -> None:
        """One forward pass for the texts and one for the image inputs; each input carries its own
        prompt (role and instruction), so queries and candidates share a pass. ``run_passes`` runs
        them (texts first, unless it runs both at once), and a request is answered as soon as the
        last pass it has inputs in is done."""
        self.stats.collections += 1
        self.stats.collected.append(len(jobs))
        passes: dict[bool, list[tuple[_Job, int]]] = defaultdict(list)
        pending: dict[int, int] = {}  # id(job) → passes still to run for it
        for job in jobs:
            pending[id(job)] = len({item.image is not None for item in job.items})
            for position, item in enumerate(job.items):
                passes[item.image is not None].append((job, position))
        results: dict[int, np.ndarray] = {}
        failed: set[int] = set()
        ordered = [members for _, members in sorted(passes.items())]  # texts first
        runs = [([job.items[position] for job, position in members],
                 [(job.role, job.instruction) for job, _ in members]) for members in ordered]
        for index, vectors in self.run_passes(runs):
            members, items = ordered[index], runs[index][0]
            if isinstance(vectors, Exception):  # handed to the waiting requests, which answer with an error
                for job, _ in members:
                    if id(job) not in failed:
                        failed.add(id(job))
                        _resolve(job, vectors)
                continue
            self.stats.batches += 1
            self.stats.inputs += len(items)
            self.stats.sizes.append(len(items))
            for row, (job, position) in enumerate(members):
                if id(job) not in failed:
                    if id(job) not in results:
                        results[id(job)] = np.empty((len(job.items), vectors.shape[1]), dtype=vectors.dtype)
                    results[id(job)][position] = vectors[row]
            for job in {id(job): job for job, _ in members}.values():
                pending[id(job)] -= 1
                if pending[id(job)] == 0 and id(job) not in failed:
                    self.stats.requests += 1
                    _resolve(job, results.pop(id(job)))


def _resolve(job: _Job, value: np.ndarray | BaseException) -> None:
    def settle() -> None:
        if job.future.done():  # the request already gave up
            return
        if isinstance(value, BaseException):
            job.future.set_exception(value)
        else:
            job.future.set_result(value)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop has closed: nobody is waiting any more
        pass


def finish(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Matryoshka truncation to ``dim``, then L2 normalisation (as ``MagicEmbedder.encode`` does)."""
    out = np.asarray(vectors, dtype=np.float32)
    if dim is not None:
        out = out[:, :dim]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)
