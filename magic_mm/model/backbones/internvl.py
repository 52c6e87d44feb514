"""``internvl``: the paper's backbone, transformers' ``InternVLForConditionalGeneration``.

Pipeline per 448-px tile: InternViT → 32×32 patch grid (CLS dropped) →
**compression** → InternVL's own 2×2 pixel shuffle → MLP projector → Qwen2 LM.
Without compression a tile costs 16×16 = 256 tokens; with ``bilinear:2`` the grid
becomes 16×16 and the pixel shuffle leaves 8×8 = 64 (the paper's 256 → 64).

The pixel shuffle needs an even grid, so the compressed grid is rounded *up* to
the next even size (``bilinear:3`` gives ceil(32/3) = 11 → 12×12 → 36 tokens).
``pixel_unshuffle`` is refused: InternVL already merges patches that way and
its projector expects the channel count of exactly one 2×2 merge.

Tiling is InternVL's dynamic preprocessing: the image is resized to the
cols×rows grid of 448-px tiles whose aspect ratio is closest to it (1 ≤ tiles ≤
``max_tiles``), cut into tiles, plus a 448-px thumbnail when there is more than
one tile.  Images are preprocessed here with PIL, so torchvision is not needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from magic_mm.errors import CompressionSpecError, ModelFolderError
from magic_mm.model.backbones.base import Backbone, count_parameters
from magic_mm.model.compression import Compression

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY = "tiny-random"


class InternVLBackbone(Backbone):
    family = "internvl"
    image_wrap = ("<img>", "</img>")

    def __init__(self, spec: dict[str, Any], compression: Compression, model: nn.Module, tokenizer: Any,
                 preprocessing: dict[str, Any]) -> None:
        if compression.method == "pixel_unshuffle":
            raise CompressionSpecError(
                "InternVL already merges 2×2 patches by pixel shuffle; use bilinear or avgpool instead"
            )
        super().__init__(spec, compression)
        self.model = model
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.tile_size = int(vision.image_size[0])
        self.patch_size = int(vision.patch_size[0])
        self.min_tiles = int(spec.get("min_tiles", preprocessing.get("min_patches", 1)))
        self.max_tiles = int(spec.get("max_tiles", preprocessing.get("max_patches", 12)))
        self.use_thumbnail = bool(preprocessing.get("crop_to_patches", True))
        self.pixel_mean = torch.tensor(preprocessing.get("image_mean", IMAGENET_MEAN))[:, None, None]
        self.pixel_std = torch.tensor(preprocessing.get("image_std", IMAGENET_STD))[:, None, None]
        for p in self.model.model.vision_tower.parameters():
            p.requires_grad_(False)

    @classmethod
    def build(cls, spec: dict[str, Any], compression: Compression) -> InternVLBackbone:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration

        base = spec.get("base")
        if base == TINY:
            model, tokenizer = tiny_internvl()
            return cls(spec, compression, model, tokenizer, {"max_patches": 4})
        folder = Path(str(base)) if base else None
        if folder is None or not (folder / "config.json").is_file():
            raise ModelFolderError(
                f"{base}: InternVL checkpoint folder not found (needs config.json and weights); "
                "download InternVL3-1B/2B/8B (transformers format, '-hf') and pass its folder"
            )
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "internvl":
            raise ModelFolderError(
                f"{folder}: model_type is {config.get('model_type')!r}, not 'internvl'; pass the "
                "transformers-format InternVL3 checkpoint (the '-hf' repositories)"
            )
        model = InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        preprocessing = {}
        for name in ("preprocessor_config.json", "processor_config.json"):
            if (folder / name).is_file():
                data = json.loads((folder / name).read_text())
                preprocessing.update(data.get("image_processor", data))
        return cls(spec, compression, model, tokenizer, preprocessing)

    @classmethod
    def tiny_spec(cls) -> dict[str, Any]:
        return {"base": TINY}

    # -- tiling ---------------------------------------------------------------------
    def tile_layout(self, width: int, height: int) -> tuple[int, int]:
        """(cols, rows) of tiles: the allowed grid with the closest aspect ratio."""
        aspect = width / height
        grids = sorted(
            {(c, r) for c in range(1, self.max_tiles + 1) for r in range(1, self.max_tiles + 1)
             if self.min_tiles <= c * r <= self.max_tiles},
            key=lambda g: g[0] * g[1],
        )
        best, best_diff = (1, 1), float("inf")
        for cols, rows in grids:
            diff = abs(aspect - cols / rows)
            if diff < best_diff:
                best, best_diff = (cols, rows), diff
            elif diff == best_diff and width * height > 0.5 * self.tile_size**2 * cols * rows:
                best = (cols, rows)  # same shape, and the image has pixels to fill more tiles
        return best

    def tiles_for_size(self, width: int, height: int) -> list[tuple[int, int]]:
        cols, rows = self.tile_layout(width, height)
        count = cols * rows + (1 if self.use_thumbnail and cols * rows > 1 else 0)
        return [(self.tile_size, self.tile_size)] * count

    def image_tiles(self, image: Image.Image) -> torch.Tensor:
        cols, rows = self.tile_layout(*image.size)
        size = self.tile_size
        resized = image.resize((cols * size, rows * size), Image.BICUBIC)
        tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
                 for r in range(rows) for c in range(cols)]
        if self.use_thumbnail and len(tiles) > 1:
            tiles.append(image.resize((size, size), Image.BICUBIC))
        pixels = torch.stack([torch.from_numpy(np.asarray(t, dtype=np.float32) / 255.0).permute(2, 0, 1)
                              for t in tiles])
        return (pixels - self.pixel_mean) / self.pixel_std

    # -- the pipeline ---------------------------------------------------------------
    def vision_grid(self, pixels: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        outputs = self.model.model.vision_tower(pixel_values=pixels, output_hidden_states=True, return_dict=True)
        layer = config.vision_feature_layer
        features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:, :]  # drop CLS
        side = pixels.shape[-1] // self.patch_size
        return features.reshape(features.shape[0], side, side, -1)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.compression.output_grid(height, width)
        return h + h % 2, w + w % 2

    def tokens_per_grid(self, height: int, width: int) -> int:
        return (height // 2) * (width // 2)

    def connect(self, grid: torch.Tensor) -> torch.Tensor:
        inner = self.model.model
        shuffled = inner.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio)
        return inner.multi_modal_projector(shuffled.reshape(grid.shape[0], -1, shuffled.shape[-1]))

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"projector": self.model.model.multi_modal_projector}

    def describe_parts(self) -> dict[str, Any]:
        inner = self.model.model
        return {
            "vision": {"name": "InternViT", "parameters": count_parameters(inner.vision_tower),
                       "tile_size": self.tile_size, "max_tiles": self.max_tiles},
            "connector": {"name": "pixel-shuffle + mlp", "parameters": count_parameters(inner.multi_modal_projector)},
            "lm": {"name": self.model.config.text_config.model_type,
                   "parameters": count_parameters(inner.language_model),
                   "hidden_size": self.model.config.text_config.hidden_size},
        }


def tiny_internvl() -> tuple[nn.Module, Any]:
    """A randomly initialised InternVL small enough for unit tests (112-px tiles)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from magic_mm.model.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = InternVLConfig(
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64, "image_size": [112, 112], "patch_size": [14, 14]},
        text_config={"model_type": "qwen2", "hidden_size": 48, "intermediate_size": 96,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "vocab_size": len(tokenizer), "max_position_embeddings": 2048},
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
    )
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(config).eval(), tokenizer
