"""Embeddings cached on disk per model, so a second evaluation costs nothing.

A model's identity (``model_fingerprint``) is computed from its files without
loading it: the model is only loaded when some item is missing from the cache.
An item's key covers everything that changes its vector: role, instruction,
text, the image file (path, size, modification time) and, for items with an
image, the compression (text-only vectors do not depend on it, so they are
shared between compression settings).

Storage: ``<cache>/eval-embeddings/<fingerprint>/shard-*.npz``, one shard per
run that added vectors, written under a temporary name and renamed into place,
so concurrent or killed runs never leave a broken file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import magic_mm
from magic_mm.data.mmeb import Item
from magic_mm.model.cache import cache_dir
from magic_mm.model.compression import Compression
from magic_mm.model.config import CONFIG_FILE, DEFAULT_MODEL_FOLDER, DEFAULT_MODEL_NAME, WEIGHTS_FILE

CHUNK = 128  # items embedded (and stored) per step


def model_fingerprint(model: str) -> str:
    """A short hash that changes whenever the model's files (or magic-mm's version) change."""
    digest = hashlib.sha256(f"magic-mm {magic_mm.__version__}\n".encode())
    folder = DEFAULT_MODEL_FOLDER if model == DEFAULT_MODEL_NAME else Path(model).expanduser()
    if folder.is_dir():
        digest.update(f"folder\n{folder.resolve()}\n".encode())
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if (folder / name).is_file():
                digest.update((folder / name).read_bytes())
        # Large base checkpoints (InternVL): size + mtime stand in for their content.
        for weights in sorted(folder.glob("*.safetensors")):
            if weights.name != WEIGHTS_FILE:
                stat = weights.stat()
                digest.update(f"{weights.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    else:
        digest.update(f"name\n{model}\n".encode())  # built-in tiny-random-* models
    return digest.hexdigest()[:16]


def item_key(item: Item, role: str, instruction: str, compression: Compression) -> str:
    parts: list[Any] = [role, instruction, item.text]
    if item.image is not None:
        stat = item.image.stat()
        parts += [str(item.image.resolve()), stat.st_size, stat.st_mtime_ns, str(compression)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class EmbeddingCache:
    """Key → vector store for one model; ``folder=None`` keeps nothing (caching off)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.vectors: dict[str, np.ndarray] = {}
        if folder is not None and folder.is_dir():
            for shard in sorted(folder.glob("shard-*.npz")):
                try:
                    with np.load(shard) as data:
                        self.vectors.update(zip(data["keys"].tolist(), data["vectors"]))
                except (OSError, ValueError, KeyError):
                    continue  # an unreadable shard only costs recomputation

    @classmethod
    def for_model(cls, model: str, root: Path | None = None, dtype: str = "float32") -> EmbeddingCache:
        """The cache of ``model``'s vectors computed in ``dtype`` (float32 keeps the old folder)."""
        base = root if root is not None else cache_dir()
        key = model_fingerprint(model) + ("" if dtype == "float32" else f"-{dtype}")
        return cls(base / "eval-embeddings" / key)

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        self.vectors.update(zip(keys, vectors))
        if self.folder is None or not len(keys):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".npz", dir=self.folder)
        os.close(fd)
        np.savez(tmp, keys=np.array(keys), vectors=np.asarray(vectors, dtype=np.float32))
        os.replace(tmp, self.folder / f"shard-{uuid.uuid4().hex}.npz")


class CachedEncoder:
    """Embeds ``Item``s through a lazily loaded ``MagicEmbedder``, reusing cached vectors.

    ``load`` builds the embedder; it is called only on the first cache miss.
    ``computed`` counts the items actually embedded (0 on a fully cached run).
    """

    def __init__(self, load: Callable[[], Any], cache: EmbeddingCache, compression: Compression,
                 default_instructions: dict[str, str], batch_size: int = 16, show_progress: bool = False) -> None:
        self._load = load
        self._model: Any = None
        self.cache = cache
        self.compression = compression
        self.default_instructions = default_instructions
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.computed = 0

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = self._load()
        return self._model

    def instruction(self, item: Item, role: str) -> str:
        return self.default_instructions.get(role, "") if item.instruction is None else item.instruction

    def encode(self, items: Sequence[Item], role: str) -> np.ndarray:
        """``(len(items), D)`` L2-normalised vectors, computing only the missing ones."""
        keys = [item_key(i, role, self.instruction(i, role), self.compression) for i in items]
        missing: dict[str, list[int]] = {}  # instruction → positions still to embed
        for pos, key in enumerate(keys):
            if key not in self.cache.vectors:
                missing.setdefault(self.instruction(items[pos], role), []).append(pos)
        from magic_mm.model.inputs import MMInput
        from magic_mm.progress import progress

        total = sum(map(len, missing.values()))
        with progress(total, self.show_progress and total > 0, f"embedding {role} items") as advance:
            for instruction, positions in missing.items():
                # Stored chunk by chunk, so an interrupted run keeps what it computed.
                for start in range(0, len(positions), CHUNK):
                    chunk = positions[start : start + CHUNK]
                    inputs = [MMInput(text=items[p].text, image=items[p].image) for p in chunk]
                    vectors = self.model.encode(inputs, instruction=instruction, role=role, batch_size=self.batch_size)
                    self.cache.add([keys[p] for p in chunk], vectors)
                    self.computed += len(chunk)
                    advance(len(chunk))
        if not items:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self.cache.vectors[k] for k in keys]).astype(np.float32)
