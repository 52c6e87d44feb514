"""magic-mm: multimodal LLMs as fast, visual-token-efficient universal embedders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from magic_mm.errors import UserError  # noqa: E402

if TYPE_CHECKING:
    from magic_mm.model.embedder import MagicEmbedder
    from magic_mm.model.fusion_reranker import FusionReranker
    from magic_mm.model.inputs import MMInput
    from magic_mm.model.reranker import MagicReranker

# The model classes import torch (about 3 s); loading them on first use keeps
# `magic-mm --help` and usage errors instant.
_LAZY = {
    "MagicEmbedder": "magic_mm.model.embedder",
    "MMInput": "magic_mm.model.inputs",
    "MagicReranker": "magic_mm.model.reranker",
    "FusionReranker": "magic_mm.model.fusion_reranker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'magic_mm' has no attribute {name!r}")


__all__ = ["FusionReranker", "MagicEmbedder", "MagicReranker", "MMInput", "UserError", "__version__"]
