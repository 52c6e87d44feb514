"""The one interface every backbone family implements.

A backbone splits an MLLM into the three steps the method needs, so that
compression, pooling, training and serving are written once:

1. ``image_tiles``  – PIL image → ``(T, 3, H, W)`` pixel tiles (T = 1 unless tiled);
2. ``vision_grid``  – tiles → ``(T, h, w, C)`` feature grid;
   → the shared ``Compression`` runs here, between vision encoder and connector ←
3. ``connect``      – compressed grid → ``(T, n, D)`` LM input embeddings;
4. ``decoder``      – a transformers base model whose ``last_hidden_state`` is
   the final, post-norm hidden state.

``encode_images`` strings 1–3 together for a batch of images.

Families whose LM needs more than ``inputs_embeds`` and ``attention_mask`` (e.g.
Qwen-VL's 3-D rotary positions) return the extra decoder arguments from
``decoder_kwargs``, given where each image's tokens landed in the padded batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from magic_mm.model.compression import Compression


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's tokens sit in an assembled, right-padded LM batch."""

    row: int  # which sequence of the batch
    start: int  # position of its first token
    length: int  # how many tokens (the length ``encode_images`` returned for it)
    image: int  # index of the image in the latest ``encode_images`` call


class Backbone(nn.Module, ABC):
    family: ClassVar[str]
    #: Text placed right before / after the visual tokens (e.g. InternVL's ``<img>``).
    image_wrap: ClassVar[tuple[str, str]] = ("", "")
    #: ``model_type`` values of raw transformers checkpoints this family loads.
    checkpoint_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: dict[str, Any], compression: Compression) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.compression = compression
        self.tokenizer: Any = None

    # -- construction ---------------------------------------------------------------
    @classmethod
    @abstractmethod
    def build(cls, spec: dict[str, Any], compression: Compression) -> Backbone:
        """Build from a spec dict (what ``config.json`` stores under ``backbone``)."""

    @classmethod
    @abstractmethod
    def tiny_spec(cls) -> dict[str, Any]:
        """A spec for a tiny randomly initialised model, for tests."""

    # -- the pipeline ---------------------------------------------------------------
    @abstractmethod
    def image_tiles(self, image: Image.Image) -> torch.Tensor:
        """``(T, 3, H, W)`` normalised pixels for one RGB image."""

    @abstractmethod
    def vision_grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` → ``(T, h, w, C)`` vision features."""

    @abstractmethod
    def connect(self, grid: torch.Tensor) -> torch.Tensor:
        """Compressed ``(T, h, w, C')`` grid → ``(T, n, D)`` LM input embeddings."""

    @property
    @abstractmethod
    def decoder(self) -> nn.Module:
        """The LM body; called with ``inputs_embeds`` and ``attention_mask``."""

    @property
    @abstractmethod
    def lm_head(self) -> nn.Module:
        """Hidden state → vocabulary logits (for the generative stage and reranker)."""

    @abstractmethod
    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules this project trains besides LoRA (saved by ``save_pretrained``)."""

    @abstractmethod
    def tiles_for_size(self, width: int, height: int) -> list[tuple[int, int]]:
        """The pixel size of every tile an image of this size is cut into."""

    def describe_parts(self) -> dict[str, Any]:
        """Name and parameter count of each part, for ``magic-mm info``."""
        return {}

    # -- shared logic ---------------------------------------------------------------
    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The grid size after compression; backbones may round it (see InternVL)."""
        return self.compression.output_grid(height, width)

    def encode_images(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """Visual-token embeddings ``(n_i, D)`` for each image (tiles concatenated)."""
        tiles = [self.image_tiles(img) for img in images]
        pixels = torch.cat(tiles).to(self.device, self.dtype)
        grid = self.vision_grid(pixels)
        grid = self.compression(grid, target=self.token_grid(grid.shape[1], grid.shape[2]))
        tokens = self.connect(grid)
        out, start = [], 0
        for t in tiles:
            out.append(tokens[start : start + len(t)].reshape(-1, tokens.shape[-1]))
            start += len(t)
        return out

    def feature_grid_size(self, tile_height: int, tile_width: int) -> tuple[int, int]:
        """The vision grid of one tile, found by running the vision encoder on zeros."""
        with torch.no_grad():
            grid = self.vision_grid(
                torch.zeros(1, 3, tile_height, tile_width, device=self.device, dtype=self.dtype)
            )
        return grid.shape[1], grid.shape[2]

    def visual_tokens(self, width: int, height: int, compression: Compression | None = None) -> int:
        """Exact number of visual tokens the LM sees for an image of this size."""
        saved = self.compression
        if compression is not None:
            self.compression = compression
        try:
            total = 0
            for tile_w, tile_h in self.tiles_for_size(width, height):
                with torch.no_grad():
                    gh, gw = self.feature_grid_size(tile_h, tile_w)
                    th, tw = self.token_grid(gh, gw)
                    total += self.tokens_per_grid(th, tw)
            return total
        finally:
            self.compression = saved

    def tokens_per_grid(self, height: int, width: int) -> int:
        """Tokens the connector emits for a compressed grid (InternVL halves each side)."""
        return height * width

    def decoder_kwargs(self, spans: list[ImageSpan], attention_mask: torch.Tensor) -> dict[str, Any]:
        """Extra decoder arguments for a padded batch (default none: ordinary 1-D positions)."""
        return {}

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(ids)

    @property
    def hidden_size(self) -> int:
        return self.decoder.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
