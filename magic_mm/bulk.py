"""Bulk embedding on Ray Data: one model per actor, loaded once, many actors in a pool.

``embed(dataset, model=…, role=…, column=…)`` adds an ``embedding`` column to a Ray
Dataset, for users who build their own pipelines; ``magic-mm index --engine ray``
(``magic_mm.index.ray_engine``) uses the same pieces: ``require_ray``, ``start_ray``,
``worker_resources`` and ``EmbedWorker``.

Ray is optional (``pip install "magic-mm[ray]"``); this module imports it only when called.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from magic_mm.errors import UserError

RAY_EXTRA = "pip install 'magic-mm[ray]'"
# A local Ray keeps its shared-memory object store small: pages stream through it in batches,
# and CI machines have little memory to spare.  MAGIC_MM_RAY_OBJECT_STORE_MB changes it.
LOCAL_OBJECT_STORE_MB = 300
OBJECT_STORE_ENV = "MAGIC_MM_RAY_OBJECT_STORE_MB"


class RayMissingError(UserError):
    """Ray Data is needed but not installed."""


class RayClusterError(UserError):
    """A Ray cluster that cannot be reached, or lacks the resources asked for."""


def require_ray(what: str = "this") -> Any:
    """Import Ray (with Ray Data) or raise a ``UserError`` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayMissingError(
            f"{what} needs Ray Data, which is not installed here ({exc}); install it with `{RAY_EXTRA}`"
        ) from None
    return ray


@dataclass(frozen=True)
class WorkerResources:
    """What each model replica (actor) gets."""

    workers: int
    gpus: float  # per worker; 0 means CPU
    cpus: float  # per worker; torch runs this many threads

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


def start_ray(address: str | None = None, workers: int = 1, cpus_per_worker: float = 1) -> bool:
    """Connect to Ray; returns True when this call started it (the caller then shuts it down).

    ``address`` None or ``"local"`` starts a private Ray on this machine (sized so that
    ``workers`` actors and the decoding tasks fit; no dashboard; a small object store).
    ``"auto"`` joins the cluster this machine belongs to; ``"ray://HOST:10001"`` is a remote one
    through Ray Client.  A Ray already running in this process (a notebook, a test) is used as is.
    """
    ray = require_ray("--engine ray" if address is None else f"--ray-address {address}")
    _quiet_ray_data()
    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        megabytes = int(os.environ.get(OBJECT_STORE_ENV, LOCAL_OBJECT_STORE_MB))
        cpus = max(os.cpu_count() or 1, int(np.ceil(workers * cpus_per_worker)) + 1)
        ray.init(num_cpus=cpus, object_store_memory=megabytes * 2**20, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        return True
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayClusterError(
            f"--ray-address {address}: cannot connect to a Ray cluster ({exc}); start one with `ray start --head` "
            "(then pass auto), pass ray://HOST:10001 for a remote one, or leave --ray-address out to start a local Ray"
        ) from None
    return True


def _quiet_ray_data() -> None:
    """Ray Data's own progress bars and per-dataset log lines would interleave with ours."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def worker_resources(workers: int | None = None, gpus_per_worker: float | None = None,
                     cpus_per_worker: float = 1) -> WorkerResources:
    """Resolve ``auto`` choices against the connected cluster and check that they fit.

    ``gpus_per_worker`` None: 1 where the cluster has GPUs, else 0.  ``workers`` None: one per
    GPU (with the GPUs each takes) where there are GPUs, else 1.
    """
    import ray

    total = ray.cluster_resources()
    gpus_there, cpus_there = float(total.get("GPU", 0)), float(total.get("CPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus_there > 0 else 0.0
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise UserError(f"--gpus-per-worker {gpus_per_worker} / --cpus-per-worker {cpus_per_worker}: use "
                        "--gpus-per-worker >= 0 and --cpus-per-worker > 0")
    if workers is None:
        workers = max(1, int(gpus_there // gpus_per_worker)) if gpus_per_worker > 0 else 1
    if workers < 1:
        raise UserError(f"--workers {workers}: use 1 or more")
    if gpus_per_worker > 0 and workers * gpus_per_worker > gpus_there:
        raise RayClusterError(
            f"--workers {workers} × --gpus-per-worker {gpus_per_worker:g} needs {workers * gpus_per_worker:g} GPUs, "
            f"but the Ray cluster has {gpus_there:g}; pass fewer --workers, a fractional --gpus-per-worker "
            "(0.5 puts two replicas on a GPU), or --gpus-per-worker 0 for CPU workers"
        )
    if workers * cpus_per_worker > cpus_there:
        raise RayClusterError(
            f"--workers {workers} × --cpus-per-worker {cpus_per_worker:g} needs {workers * cpus_per_worker:g} CPUs, "
            f"but the Ray cluster has {cpus_there:g}; pass fewer --workers or a smaller --cpus-per-worker"
        )
    return WorkerResources(workers=workers, gpus=float(gpus_per_worker), cpus=float(cpus_per_worker))


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The ``UserError`` a Ray task raised (its own message, without Ray's traceback), else ``exc``."""
    for _ in range(5):
        if isinstance(exc, UserError) and not type(exc).__name__.startswith("RayTaskError"):
            return exc
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException):
            return exc
        exc = cause
    return exc


class EmbedWorker:
    """One model replica: ``MagicEmbedder.from_pretrained`` once, in the actor's constructor,
    then ``encode`` per batch.  Runs on the GPU Ray gives the actor, if any."""

    def __init__(self, model: str, compression: str | None, dtype: str, cpus: float, batch_size: int) -> None:
        import torch

        from magic_mm.model.embedder import MagicEmbedder

        torch.set_num_threads(max(1, int(cpus)))
        device = "cuda" if _assigned_gpus() else "cpu"
        self.embedder = MagicEmbedder.from_pretrained(model, compression=compression, device=device, dtype=dtype)
        self.batch_size = batch_size

    def encode(self, inputs: list[Any], role: str, instruction: str | None = None,
               dim: int | None = None) -> np.ndarray:
        return self.embedder.encode(inputs, role=role, instruction=instruction, batch_size=self.batch_size, dim=dim)


def _assigned_gpus() -> list[Any]:
    import ray

    try:
        return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
    except Exception:  # outside an actor
        return []


class _ColumnWorker(EmbedWorker):
    """``embed``'s actor: the values of ``column`` (and ``text_column``) → ``output_column``."""

    def __init__(self, model: str, compression: str | None, dtype: str, cpus: float, batch_size: int,
                 column: str, text_column: str | None, output_column: str, role: str,
                 instruction: str | None, dim: int | None, paths: bool) -> None:
        super().__init__(model, compression, dtype, cpus, batch_size)
        self.column, self.text_column, self.output_column = column, text_column, output_column
        self.role, self.instruction, self.dim, self.paths = role, instruction, dim, paths

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in (self.column, self.text_column):
            if name is not None and name not in batch:
                raise UserError(f"column {name!r}: the dataset has no such column (it has {', '.join(batch)})")
        values = batch[self.column]
        texts = batch[self.text_column] if self.text_column else None
        inputs = []
        for i, value in enumerate(values):
            item = _as_model_input(value, self.paths, f"{self.column}")
            if texts is not None:
                item = (item, str(texts[i]))
            inputs.append(item)
        batch[self.output_column] = self.encode(inputs, self.role, self.instruction, self.dim)
        return batch


def _as_model_input(value: Any, paths: bool, column: str) -> Any:
    """A dataset cell as ``encode`` takes it: str → text (or a file path with ``paths``),
    bytes → an encoded image, a uint8 (H, W, 3) array → a decoded image."""
    from PIL import Image

    if isinstance(value, np.ndarray):
        if value.dtype == np.uint8 and value.ndim == 3 and value.shape[-1] in (3, 4):
            return Image.fromarray(value).convert("RGB")
        if value.dtype == object and value.ndim == 0:
            value = value.item()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return Path(value) if paths else value
    if isinstance(value, Image.Image):
        return value
    raise UserError(f"column {column!r}: cannot embed a value of type {type(value).__name__}; use str (text, or "
                    "an image path with paths=True), bytes (an encoded image) or a uint8 (H, W, 3) array")


def embed(
    dataset: Any,
    model: str = "magic-mm-tiny",
    role: str = "candidate",
    column: str = "item",
    *,
    text_column: str | None = None,
    output_column: str = "embedding",
    paths: bool = False,
    instruction: str | None = None,
    dim: int | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1,
    batch_size: int = 16,
    compression: str | None = None,
    dtype: str = "auto",
) -> Any:
    """Return ``dataset`` with an ``output_column`` (default ``embedding``): the vector of each row.

    ``column`` holds the inputs: ``str`` texts (or image file paths, with ``paths=True``),
    ``bytes`` (encoded images) or uint8 ``(H, W, 3)`` arrays (decoded images).  ``text_column``
    pairs a text with each image (an image+text input).  ``role`` is ``"query"`` or ``"candidate"``
    (the prompt side, as in ``MagicEmbedder.encode``).  Embedding runs in a pool of ``workers``
    actors, each holding one model loaded once (``gpus_per_worker`` GPUs each where the cluster
    has GPUs).  Lazy, like every Ray Dataset: nothing runs until the result is consumed.
    Connects to (or starts) Ray first if this process has not.
    """
    ray = require_ray("magic_mm.bulk.embed")
    if role not in ("query", "candidate"):
        raise UserError(f"role={role!r}: use 'query' or 'candidate'")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: use 1 or more")
    schema = dataset.schema(fetch_if_missing=False)  # known without running the pipeline, or None
    columns = list(schema.names) if schema is not None else None
    for name in (column, text_column):
        if name is not None and columns is not None and name not in columns:
            raise UserError(f"column {name!r}: the dataset has no such column (it has {', '.join(columns)})")
    if not ray.is_initialized():
        start_ray(None, workers or 1, cpus_per_worker)
    else:
        _quiet_ray_data()
    resources = worker_resources(workers, gpus_per_worker, cpus_per_worker)
    run_dtype = resolve_worker_dtype(dtype, resources)
    return dataset.map_batches(
        _ColumnWorker,
        fn_constructor_kwargs={"model": model, "compression": compression, "dtype": run_dtype,
                               "cpus": resources.cpus, "batch_size": batch_size, "column": column,
                               "text_column": text_column, "output_column": output_column, "role": role,
                               "instruction": instruction, "dim": dim, "paths": paths},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=resources.workers),
        num_cpus=resources.cpus, num_gpus=resources.gpus or None,
    )


def resolve_worker_dtype(dtype: str, resources: WorkerResources) -> str:
    """The dtype name every worker runs in: ``auto`` resolved once, on the driver, for the workers'
    device, so that all replicas (and the index stamp) agree."""
    import torch

    from magic_mm.model.dtypes import DTYPE_ENV, dtype_name, parse_dtype, resolve_dtype

    if (resources.gpus > 0 and not torch.cuda.is_available() and parse_dtype(dtype, "--dtype") is None
            and not os.environ.get(DTYPE_ENV)):
        return "bfloat16"  # the driver has no GPU to ask; the GPUs Ray schedules today compute bf16
    return dtype_name(resolve_dtype(dtype, resources.device))
