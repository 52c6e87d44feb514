"""The dual encoder at inference: frozen EfficientNet-Lite0 for images, a frozen mean-pooled
BERT-like text encoder (all-MiniLM-L6-v2 by default) for captions, and two linear heads into
one D-dimensional space.

It is row 7 of the default-model table, and the second retriever of ``FusionReranker``
(``magic_mm/model/fusion_reranker.py``).  ``benchmarks/dual_encoder.py`` trains the heads
and saves a folder with ``dual_encoder.json`` and ``heads.safetensors``; this module loads,
saves and runs it.  Images go in at ``image_size`` (448 like magic-mm-tiny) and the
1280-channel grid is global-average-pooled to one vector; captions are mean-pooled over their
tokens and L2-normalised (as all-MiniLM-L6-v2 does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from magic_mm.errors import ModelFolderError, UserError
from magic_mm.model import efficientnet_lite
from magic_mm.model.inputs import ImageLike, load_image
from magic_mm.model.sentence_encoder import MINILM, SentenceEncoder

CONFIG_FILE = "dual_encoder.json"
HEADS_FILE = "heads.safetensors"
FORMAT = "magic-mm-dual-encoder"


@dataclass
class DualConfig:
    """What a saved dual encoder is made of (the frozen parts are named, not stored)."""

    vision: str = "efficientnet-lite0"  # an efficientnet_lite.VARIANTS name
    text: str = MINILM  # MINILM, or a folder with a BERT-like model + tokenizer (tests)
    image_size: int = 448
    max_text_tokens: int = 256  # all-MiniLM-L6-v2's own limit
    dim: int = 256  # shared embedding size D


class FrozenEncoders:
    """EfficientNet-Lite0 (pooled) and a mean-pooled BERT-like text encoder; no gradients."""

    def __init__(self, config: DualConfig) -> None:
        self.config = config
        self.vision = efficientnet_lite.load_variant(config.vision)
        self.text = SentenceEncoder(config.text, config.max_text_tokens)

    @property
    def text_dim(self) -> int:
        return self.text.dim

    @torch.no_grad()
    def images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """(n, 1280): the final grid, global-average-pooled."""
        pixels = torch.cat([efficientnet_lite.image_pixels(load_image(i), self.config.image_size) for i in images])
        return self.vision.features(pixels).mean(dim=(2, 3))

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, hidden): mean-pooled, L2-normalised sentence vectors."""
        return self.text.encode(texts)


class LinearHead(nn.Module):
    """A linear map of standardised features.  Pooled EfficientNet features share a large common
    offset (norm ~60, per-channel spread well under 1); standardising with the train split's
    statistics (buffers, saved with the weights) lets the optimiser see the differences between
    images from the first step.  Still one affine map of the frozen features."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))

    def fit_statistics(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.scale.copy_(features.std(0).clamp(min=1e-6) if len(features) > 1 else torch.ones_like(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.scale)


def make_heads(config: DualConfig, text_dim: int, seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({"image": LinearHead(efficientnet_lite.HEAD_CHANNELS, config.dim),
                          "text": LinearHead(text_dim, config.dim)})


class DualEncoder:
    """The dual encoder at inference: ``encode`` mirrors MagicEmbedder's (role "candidate" takes
    images, role "query" takes captions) so the table code measures both the same way."""

    def __init__(self, config: DualConfig, heads: nn.ModuleDict, encoders: FrozenEncoders | None = None,
                 training: dict[str, Any] | None = None) -> None:
        self.config = config
        self.encoders = encoders or FrozenEncoders(config)
        self.heads = heads.eval()
        self.training = training or {}

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> DualEncoder:
        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise ModelFolderError(f"{folder}: not a dual-encoder folder (no {CONFIG_FILE}); "
                                   f"make one with `python benchmarks/dual_encoder.py --out {folder}`")
        try:
            spec = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelFolderError(f"{config_path}: not valid JSON ({exc}); retrain the dual encoder") from None
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            found = spec.get("format") if isinstance(spec, dict) else None
            raise ModelFolderError(f"{config_path}: format is {found!r}, not {FORMAT!r}; "
                                   "point at a folder saved by benchmarks/dual_encoder.py")
        if not (folder / HEADS_FILE).is_file():
            raise ModelFolderError(f"{folder}: {HEADS_FILE} is missing; retrain the dual encoder")
        try:
            config = DualConfig(**spec["config"])
        except (KeyError, TypeError) as exc:
            raise ModelFolderError(f"{config_path}: malformed \"config\" ({exc}); retrain the dual encoder") from None
        encoders = FrozenEncoders(config)
        heads = make_heads(config, encoders.text_dim)
        try:
            state = load_file(folder / HEADS_FILE)
        except (SafetensorError, OSError) as exc:
            raise ModelFolderError(f"{folder / HEADS_FILE}: unreadable ({exc}); retrain the dual encoder") from None
        try:
            heads.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelFolderError(f"{folder / HEADS_FILE}: does not fit {config} ({exc}); retrain") from None
        return cls(config, heads, encoders, spec.get("training"))

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}, folder / HEADS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(
            {"format": FORMAT, "config": asdict(self.config), "training": self.training}, indent=2) + "\n")
        return folder

    @torch.no_grad()
    def project(self, features: torch.Tensor, role: str) -> np.ndarray:
        head = self.heads["image" if role == "candidate" else "text"]
        return F.normalize(head(features), dim=-1).numpy()

    def encode(self, inputs: Sequence[Any], role: str = "query", batch_size: int = 32) -> np.ndarray:
        """L2-normalised (n, D) vectors; "candidate" inputs are images, "query" inputs captions."""
        if role not in ("query", "candidate"):
            raise UserError(f"role {role!r}: use 'query' (captions) or 'candidate' (images)")
        embed = self.encoders.images if role == "candidate" else self.encoders.texts
        chunks = [self.project(embed(inputs[s : s + batch_size]), role) for s in range(0, len(inputs), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.config.dim), np.float32)
