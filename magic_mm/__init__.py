"""magic-mm: multimodal LLMs as fast, visual-token-efficient universal embedders."""

from __future__ import annotations

__version__ = "0.1.0"

from magic_mm.errors import UserError  # noqa: E402
from magic_mm.model.embedder import MagicEmbedder  # noqa: E402
from magic_mm.model.inputs import MMInput  # noqa: E402
from magic_mm.model.reranker import MagicReranker  # noqa: E402

__all__ = ["MagicEmbedder", "MagicReranker", "MMInput", "UserError", "__version__"]
