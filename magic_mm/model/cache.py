"""The user cache folder, for derived files such as dequantised GGUF weights."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """``$MAGIC_MM_CACHE``, else ``$XDG_CACHE_HOME/magic-mm``, else ``~/.cache/magic-mm``."""
    if os.environ.get("MAGIC_MM_CACHE"):
        return Path(os.environ["MAGIC_MM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "magic-mm"


def cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir()/name``, calling ``build(tmp)`` to create it if missing.

    The folder is built under a temporary name and renamed into place, so a run
    killed half-way never leaves a partial cache behind.
    """
    target = cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; use its copy
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
