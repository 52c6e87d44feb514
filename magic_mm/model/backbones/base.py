"""The one interface every backbone family implements.

A backbone splits an MLLM into the three steps the method needs, so that
compression, pooling, training and serving are written once:

1. ``image_tiles``  – PIL image → ``(T, 3, H, W)`` pixel tiles (T = 1 unless tiled);
2. ``vision_grid``  – tiles → ``(T, h, w, C)`` feature grid;
   → the shared ``Compression`` runs here, between vision encoder and connector ←
3. ``connect``      – compressed grid → ``(T, n, D)`` LM input embeddings;
4. ``decoder``      – a transformers base model whose ``last_hidden_state`` is
   the final, post-norm hidden state.

``vision_features`` runs steps 1–2 (a ``VisionGrid`` per image, which training
caches because the vision encoder is frozen); ``encode_images`` takes images or
such grids and returns one ``ImageTokens`` per image: its LM input embeddings
together with everything the LM needs to know about them (marker texts, Qwen's
grid, DeepStack features).  ``magic_mm.model.lm_batch`` splices them into a
padded batch and asks the backbone for that batch's positions and extra decoder
arguments (``position_ids`` / ``decoder_kwargs``).  Nothing about an image is
kept on the backbone between calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from magic_mm.model.compression import Compression


@dataclass(frozen=True)
class VisionGrid:
    """One image's uncompressed vision features, and the tiling they came from.

    What the frozen vision encoder produces; ``encode_images`` accepts it in place
    of the image (training caches these, see ``magic_mm.train.features``).
    """

    features: torch.Tensor  # (T, h, w, C), one grid per tile
    layout: tuple[int, ...] = ()  # family-specific tiling, e.g. Idefics3's (rows, cols)


@dataclass(frozen=True)
class ImageTokens:
    """One image as the LM sees it, with its metadata carried alongside.

    The LM sequence of an image is ``markers[0], tokens of piece 0, markers[1], ...,
    markers[-1]``: ``markers`` are texts (e.g. InternVL's ``<img>`` / ``</img>``,
    Idefics3's per-tile ``<row_1_col_1>``), ``pieces`` split ``embeds`` into the
    runs of visual tokens between them.
    """

    embeds: torch.Tensor  # (n, D) visual tokens of every piece, in order
    markers: tuple[str, ...]  # len(pieces) + 1 texts around the pieces
    pieces: tuple[int, ...]  # visual-token count of each piece; sums to n
    grid_thw: tuple[int, int, int] | None = None  # Qwen-VL: compressed patch grid (for M-RoPE)
    deepstack: tuple[torch.Tensor, ...] = ()  # Qwen3-VL: one (n, D) tensor per DeepStack level

    def __post_init__(self) -> None:
        if len(self.markers) != len(self.pieces) + 1 or sum(self.pieces) != len(self.embeds):
            raise ValueError(f"{len(self.embeds)} visual tokens in pieces {self.pieces} with "
                             f"{len(self.markers)} markers do not fit together")


ImageInput = Image.Image | VisionGrid  # what ``encode_images`` takes per image


# On a CPU, glibc's malloc serves a block over 32 MiB with a fresh mmap and unmaps it on free,
# so a vision-encoder call whose activations pass that size makes the kernel fault in and zero
# every page of them again, on every call. EfficientNet-Lite0's widest map (96 channels at half
# the tile size) is 8 bytes per byte of input tile: at 448 px in bf16, 9.6 MB a tile, so 3 tiles
# a call stay under the line and 4 do not (49 against 2,352 page faults and 20.3 against 25.8 ms
# per image, benchmarks/vision_batch.py). The ViTs' widest activations (their MLPs) are about 7×
# their input, so the same rule serves every family. A GPU gets every tile in one call.
MALLOC_FRESH_MAPPING_BYTES = 32 * 2**20
WIDEST_ACTIVATION_PER_INPUT_BYTE = 8


def cpu_vision_tiles_per_call(tile: torch.Tensor) -> int:
    """Tiles like ``tile`` (one ``(3, H, W)`` tile, in the encoder's dtype) per CPU vision-encoder
    call: as many as keep the widest activation under malloc's fresh-mapping size, at least one."""
    per_tile = WIDEST_ACTIVATION_PER_INPUT_BYTE * tile.numel() * tile.element_size()
    return max(1, MALLOC_FRESH_MAPPING_BYTES // per_tile)


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
    @property
    def decode_size(self) -> tuple[int, int] | None:
        """(width, height) below which no image's preprocessing ever goes, so a large JPEG can
        be decoded at a reduced scale down to it (``inputs.load_image``). Default: None (full
        size), for backbones whose preprocessing size depends on the image."""
        return None

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """Thread-safe image work done ahead of ``image_tiles`` on a decode worker thread
        (``MagicEmbedder.encode`` overlaps it with the model); must not change what
        ``image_tiles`` returns.  Default: nothing."""
        return image

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

    def vision_features(self, images: Sequence[Image.Image]) -> list[VisionGrid]:
        """Uncompressed vision grids, one vision-encoder call for every tile of ``images``."""
        tiles = [self.image_tiles(img) for img in images]
        sizes = [len(t) for t in tiles]
        # Each tile is converted to the encoder's dtype as it is copied into the batch, which keeps
        # the tiles' layout (channels-last for EfficientNet): one pass instead of a concatenation,
        # a conversion and a change of layout.
        channels_last = tiles[0].is_contiguous(memory_format=torch.channels_last)
        pixels = torch.empty((sum(sizes), *tiles[0].shape[1:]), dtype=self.dtype, device=self.device,
                             memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for place, tile in zip(pixels.split(sizes), tiles):
            place.copy_(tile)
        per_call = cpu_vision_tiles_per_call(pixels[0]) if self.device.type == "cpu" else len(pixels)
        # Calls as even as the cap allows: 4 tiles at 3 a call go as 2 + 2, as a lone tile costs
        # more per tile than any other call size (34.3 against 20-22 ms, benchmarks/vision_batch.py).
        calls = -(-len(pixels) // per_call)
        grid = torch.cat([self.vision_grid(chunk) for chunk in pixels.tensor_split(calls)])
        return [VisionGrid(part) for part in grid.split(sizes)]

    def encode_images(self, images: Sequence[ImageInput]) -> list[ImageTokens]:
        """LM input of each image (a PIL image, or its ``VisionGrid`` computed earlier)."""
        pictures = [img for img in images if not isinstance(img, VisionGrid)]
        computed = iter(self.vision_features(pictures) if pictures else [])
        grids = [img if isinstance(img, VisionGrid) else next(computed) for img in images]
        return self.image_tokens(grids) if grids else []

    def image_tokens(self, grids: list[VisionGrid]) -> list[ImageTokens]:
        """Compression → connector → ``ImageTokens`` (all tiles, same size, in one call)."""
        features = torch.cat([g.features for g in grids]).to(self.device, self.dtype)
        compressed = self.compression(features, target=self.token_grid(features.shape[1], features.shape[2]))
        tokens = self.connect(compressed)
        out = []
        for part in tokens.split([len(g.features) for g in grids]):
            embeds = part.reshape(-1, part.shape[-1])
            out.append(ImageTokens(embeds, self.image_wrap, (len(embeds),)))
        return out

    def feature_grid_size(self, tile_height: int, tile_width: int) -> tuple[int, int]:
        """The vision grid of one tile, found once per tile size by running the vision encoder on zeros.

        Memoised: the server counts visual tokens for every image it answers, and a vision
        pass per count cost as much as embedding the image."""
        known = self.__dict__.setdefault("_feature_grid_sizes", {})
        if (tile_height, tile_width) not in known:
            with torch.no_grad():
                grid = self.vision_grid(
                    torch.zeros(1, 3, tile_height, tile_width, device=self.device, dtype=self.dtype)
                )
            known[(tile_height, tile_width)] = (grid.shape[1], grid.shape[2])
        return known[(tile_height, tile_width)]

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

    def position_ids(self, attention_mask: torch.Tensor, visual_mask: torch.Tensor,
                     images: Sequence[ImageTokens]) -> torch.Tensor:
        """Positions of a right-padded batch: ordinary 1-D ``0..L-1`` per row by default.

        ``visual_mask`` ``(B, L)`` marks every visual token; ``images`` are the batch's
        images in the order their tokens appear in it (row by row, left to right).
        """
        rows, length = attention_mask.shape
        return torch.arange(length, device=attention_mask.device).expand(rows, length)

    def decoder_kwargs(self, visual_mask: torch.Tensor, images: Sequence[ImageTokens]) -> dict[str, Any]:
        """Decoder arguments beyond embeddings, mask and positions (default none; Qwen3-VL's DeepStack)."""
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
