"""Model threads on a CPU: passes run side by side, each on its share of torch's intra-op threads.

A convolution's or a small product's work does not split well over cores inside one operator,
so on a CPU two passes side by side, each on its share of the threads, fill the cores better than
one pass on all of them (``benchmarks/image_batch_ceiling.py``, ``benchmarks/model_workers.py``).
The server splits its image passes this way; ``MagicEmbedder.encode`` and ``magic-mm index``
run successive batches this way.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

J = TypeVar("J")
R = TypeVar("R")

DEFAULT_WORKERS = 2


def _use_threads(count: int) -> None:
    torch.set_num_threads(count)
    # torch reads the process-wide count into a thread's own on the thread's first query; do it
    # now, while that count is this one, so that putting the process-wide count back later
    # leaves this thread's alone.
    torch.get_num_threads()


def model_worker_pool(device: torch.device, workers: int, prefix: str = "magic-mm-model") -> ThreadPoolExecutor | None:
    """``workers`` threads, each with an equal share of torch's intra-op threads (the count is per
    thread, so the calling thread keeps all of them). None where splitting cannot help: fewer than
    two workers asked for, a GPU, or fewer intra-op threads than workers."""
    threads = torch.get_num_threads()
    if workers < 2 or device.type != "cpu" or threads < workers:
        return None
    pool = ThreadPoolExecutor(workers, thread_name_prefix=prefix, initializer=_use_threads,
                              initargs=(threads // workers,))
    # torch.set_num_threads also sets the count every thread started later begins with, so a
    # thread started after the workers would run on threads // workers. Start every worker now
    # (each waits at the barrier until all exist), then put the default back.
    barrier = threading.Barrier(workers)
    for started in [pool.submit(barrier.wait) for _ in range(workers)]:
        started.result()
    torch.set_num_threads(threads)
    return pool


def map_in_order(fn: Callable[[J], R], jobs: Iterable[J], pool: ThreadPoolExecutor | None,
                 workers: int) -> Iterator[tuple[J, R]]:
    """``(job, fn(job))`` for each job, in the jobs' order, with the ``workers`` threads of ``pool``
    busy while the caller makes the next job (``jobs`` is consumed on the calling thread) and
    takes the results. Without a pool every job runs here. Jobs run under the caller's CPU autocast,
    as they would here. A job's exception is raised at its turn; jobs not yet started are then
    cancelled."""
    if pool is None:
        for job in jobs:
            yield job, fn(job)
        return
    fn = under_callers_autocast(fn)
    # One job more than there are workers in flight, so a worker that finishes finds the next
    # job waiting while the caller takes the last one's result.
    in_flight = workers + 1
    running: deque[tuple[J, Future[R]]] = deque()
    try:
        for job in jobs:
            running.append((job, pool.submit(fn, job)))
            if len(running) >= in_flight:
                done, future = running.popleft()
                yield done, future.result()
        while running:
            done, future = running.popleft()
            yield done, future.result()
    finally:
        for _, future in running:
            future.cancel()


def under_callers_autocast(fn: Callable[[J], R]) -> Callable[[J], R]:
    """``fn`` run under the calling thread's CPU autocast, if it is on: torch keeps autocast per
    thread, so a batch handed to a worker would otherwise run in the weights' dtype."""
    if not torch.is_autocast_enabled("cpu"):
        return fn
    dtype = torch.get_autocast_dtype("cpu")

    def run(job: J) -> R:
        with torch.autocast("cpu", dtype=dtype):
            return fn(job)
    return run
