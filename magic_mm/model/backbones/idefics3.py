"""``idefics3``: Idefics3 and SmolVLM through transformers' own classes.

Pipeline per tile: SigLIP-style vision encoder → g×g patch grid → **compression**
→ the model's own pixel-shuffle connector (scale factor r) → projection → Llama LM.

Tiling is the image processor's (PIL backend, so no torchvision): the image is
resized so its longest side is ``longest_edge``, padded up to whole tiles of
``tile`` px, cut into rows × cols tiles, plus one global tile of the whole image
(one tile only when ``image_splitting`` is off or the image fits a tile).  The
visual tokens are laid out as the checkpoints were trained, each tile behind
``<fake_token_around_image><row_R_col_C>`` and the global tile behind
``<global-img>``; those marker tokens are text, not visual tokens.

Token budget: ``longest_edge`` and ``image_splitting`` are spec keys next to
compression.  Without compression a tile costs (g/r)² tokens (SmolVLM-256M: 512-px
tiles, g = 32, r = 4 → 64; Idefics3-8B: 364 px, g = 26, r = 2 → 169).

Grids and the scale factor
--------------------------
The pixel shuffle needs a square grid whose side divides by r, so the compressed
side ``ceil(g/s)`` is rounded *up* to the next multiple of r: SmolVLM's 32 with
s = 2 → 16 → 4×4 = 16 tokens per tile; with s = 3 → 11 → 12 → 9 tokens;
Idefics3's 26 with s = 2 → 13 → 14 → 49 tokens.  ``pixel_unshuffle`` is refused:
the connector's projection expects the channels of exactly one r×r shuffle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from magic_mm.errors import CompressionSpecError, ModelFolderError
from magic_mm.model.backbones.base import Backbone, ImageTokens, VisionGrid, count_parameters
from magic_mm.model.compression import Compression

TINY = "tiny-random"
RANDOM_FULL = "random-full"  # full-size shapes, random weights: for timing only
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


@dataclass(frozen=True)
class Variant:
    model_class: str
    config_class: str
    processor_module: str
    processor_class: str


VARIANTS: dict[str, Variant] = {
    "idefics3": Variant("Idefics3ForConditionalGeneration", "Idefics3Config",
                        "transformers.models.idefics3.image_processing_pil_idefics3", "Idefics3ImageProcessorPil"),
    "smolvlm": Variant("SmolVLMForConditionalGeneration", "SmolVLMConfig",
                       "transformers.models.smolvlm.image_processing_pil_smolvlm", "SmolVLMImageProcessorPil"),
}


class Idefics3Backbone(Backbone):
    family = "idefics3"
    checkpoint_types = tuple(VARIANTS)

    def __init__(self, spec: dict[str, Any], compression: Compression, model: nn.Module, tokenizer: Any,
                 processor: Any, variant: str) -> None:
        if compression.method == "pixel_unshuffle":
            raise CompressionSpecError(
                f"{variant}'s connector already pixel-shuffles the grid; use bilinear or avgpool instead"
            )
        super().__init__(spec, compression)
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.variant = variant
        self.patch_size = int(model.config.vision_config.patch_size)
        self.scale = int(model.config.scale_factor)
        self.tile_size = int(processor.max_image_size["longest_edge"])
        for p in self.model.model.vision_model.parameters():
            p.requires_grad_(False)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def build(cls, spec: dict[str, Any], compression: Compression) -> Idefics3Backbone:
        import transformers
        from transformers import AutoTokenizer

        base = spec.get("base")
        if base in (TINY, RANDOM_FULL):
            variant = str(spec.get("variant", "smolvlm"))
            if variant not in VARIANTS:
                raise ModelFolderError(f"unknown idefics3 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
            from magic_mm.model.tiny import byte_tokenizer, byte_tokenizer_with

            config, settings = tiny_config(variant) if base == TINY else full_size_config(variant)
            # Full-size vocabularies have room for the tile markers as single tokens, as in the real ones.
            markers = [FAKE_TOKEN, GLOBAL_TOKEN] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
            tokenizer = byte_tokenizer() if base == TINY else byte_tokenizer_with(markers)
            torch.manual_seed(0)
            model = getattr(transformers, VARIANTS[variant].model_class)(config).eval()
            return cls(spec, compression, model, tokenizer, _processor(variant, None, settings, spec), variant)
        folder = Path(str(base)) if base else None
        if folder is None or not (folder / "config.json").is_file():
            raise ModelFolderError(
                f"{base}: Idefics3/SmolVLM checkpoint folder not found (needs config.json, weights and "
                "tokenizer files); download the checkpoint in transformers format and pass its folder"
            )
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type not in VARIANTS:
            raise ModelFolderError(
                f"{folder}: model_type is {model_type!r}; the idefics3 family loads {', '.join(VARIANTS)}"
            )
        model_cls = getattr(transformers, VARIANTS[model_type].model_class)
        model = model_cls.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(spec, compression, model, tokenizer, _processor(model_type, folder, {}, spec), model_type)

    @classmethod
    def tiny_spec(cls) -> dict[str, Any]:
        return {"base": TINY, "variant": "smolvlm"}

    # -- sizes ----------------------------------------------------------------------
    def tile_layout(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of split tiles; (0, 0) when the image is a single global tile."""
        _, rows, cols = self.processor.get_number_of_image_patches(height, width)
        return rows, cols

    def tiles_for_size(self, width: int, height: int) -> list[tuple[int, int]]:
        rows, cols = self.tile_layout(width, height)
        count = rows * cols + 1 if rows * cols else 1
        return [(self.tile_size, self.tile_size)] * count

    def feature_grid_size(self, tile_height: int, tile_width: int) -> tuple[int, int]:
        return tile_height // self.patch_size, tile_width // self.patch_size

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.compression.output_grid(height, width)
        r = self.scale
        return -(-h // r) * r, -(-w // r) * r  # whole r×r shuffle blocks

    def tokens_per_grid(self, height: int, width: int) -> int:
        return (height // self.scale) * (width // self.scale)

    # -- the pipeline ---------------------------------------------------------------
    def _tiles_and_layout(self, image: Image.Image) -> tuple[torch.Tensor, int, int]:
        out = self.processor(images=[[image]], return_tensors="pt", return_row_col_info=True)
        return out["pixel_values"][0], int(out["rows"][0][0]), int(out["cols"][0][0])

    def image_tiles(self, image: Image.Image) -> torch.Tensor:
        """``(T, 3, tile, tile)``: rows × cols split tiles in row-major order, then the global tile."""
        return self._tiles_and_layout(image)[0]

    def vision_grid(self, pixels: torch.Tensor) -> torch.Tensor:
        states = self.model.model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state
        side = pixels.shape[-1] // self.patch_size
        return states.reshape(states.shape[0], side, side, -1)

    def connect(self, grid: torch.Tensor) -> torch.Tensor:
        t, h, w, c = grid.shape
        return self.model.model.connector(grid.reshape(t, h * w, c))

    def tile_markers(self, rows: int, cols: int) -> list[str]:
        """The text before each tile's tokens, then the text after the last (processor layout)."""
        if rows * cols == 0:
            return [FAKE_TOKEN + GLOBAL_TOKEN, FAKE_TOKEN]
        markers = []
        for r in range(rows):
            for c in range(cols):
                lead = "\n" if r and c == 0 else ""  # each row of tiles ends with a line break
                markers.append(f"{lead}{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>")
        return markers + [f"\n\n{FAKE_TOKEN}{GLOBAL_TOKEN}", FAKE_TOKEN]

    def vision_features(self, images: Sequence[Image.Image]) -> list[VisionGrid]:
        """Every tile's grid in one vision call; each image keeps its (rows, cols) tiling for its markers."""
        prepared = [self._tiles_and_layout(image) for image in images]
        grid = self.vision_grid(torch.cat([tiles for tiles, _, _ in prepared]).to(self.device, self.dtype))
        parts = grid.split([len(tiles) for tiles, _, _ in prepared])
        return [VisionGrid(part, (rows, cols)) for part, (_, rows, cols) in zip(parts, prepared)]

    def image_tokens(self, grids: list[VisionGrid]) -> list[ImageTokens]:
        """Each tile's visual tokens as one piece, behind the tile-marker text the checkpoints were trained with."""
        for vision in grids:
            if len(vision.layout) != 2:
                raise ValueError("an idefics3 vision grid needs its (rows, cols) tiling; "
                                 "compute it with vision_features (a cache from an older version lacks it)")
        out = []
        for vision, image in zip(grids, super().image_tokens(grids)):
            tiles = len(vision.features)
            out.append(ImageTokens(image.embeds, tuple(self.tile_markers(*vision.layout)),
                                   (len(image.embeds) // tiles,) * tiles))
        return out

    # -- parts ----------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.model.model.text_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"connector": self.model.model.connector}

    def describe_parts(self) -> dict[str, Any]:
        inner = self.model.model
        return {
            "vision": {"name": f"{self.variant} vision encoder", "parameters": count_parameters(inner.vision_model),
                       "tile_size": self.tile_size, "longest_edge": self.processor.size["longest_edge"],
                       "image_splitting": bool(self.processor.do_image_splitting)},
            "connector": {"name": f"pixel-shuffle ×{self.scale} + linear",
                          "parameters": count_parameters(inner.connector)},
            "lm": {"name": self.model.config.text_config.model_type, "parameters": count_parameters(inner.text_model),
                   "hidden_size": self.model.config.text_config.hidden_size},
        }


def _processor(variant: str, folder: Path | None, settings: dict[str, Any], spec: dict[str, Any]) -> Any:
    """transformers' PIL image processor for the variant, with the spec's token-budget overrides."""
    import importlib

    kind = VARIANTS[variant]
    cls = getattr(importlib.import_module(kind.processor_module), kind.processor_class)
    overrides = dict(settings)
    if spec.get("longest_edge") is not None:
        overrides["size"] = {"longest_edge": int(spec["longest_edge"])}
    if spec.get("image_splitting") is not None:
        overrides["do_image_splitting"] = bool(spec["image_splitting"])
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        return cls.from_pretrained(folder, **overrides)
    return cls(**overrides)


def tiny_config(variant: str) -> tuple[Any, dict[str, Any]]:
    """A tiny random config (64-px tiles, 8×8 patch grid, r = 2) and its processor settings."""
    import transformers

    from magic_mm.model.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = getattr(transformers, VARIANTS[variant].config_class)(
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64, "image_size": 64, "patch_size": 8},
        text_config={"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 4096, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
    )
    return config, {"size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 64}}


def full_size_config(variant: str = "smolvlm") -> tuple[Any, dict[str, Any]]:
    """Published shapes (SmolVLM-256M, Idefics3-8B-Llama3) and processor settings, for timing at random init."""
    import transformers

    if variant == "smolvlm":
        vision = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072, "image_size": 512, "patch_size": 16}
        text = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49280,
                "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True}
        scale, processor = 4, {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}}
    elif variant == "idefics3":
        vision = {"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16,
                  "intermediate_size": 4304, "image_size": 364, "patch_size": 14}
        text = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128259,
                "max_position_embeddings": 10240, "rope_theta": 500000.0}
        scale, processor = 2, {"size": {"longest_edge": 4 * 364}, "max_image_size": {"longest_edge": 364}}
    else:
        raise ModelFolderError(f"unknown idefics3 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    config = getattr(transformers, VARIANTS[variant].config_class)(
        vision_config=vision, text_config=text, scale_factor=scale
    )
    return config, processor


def full_size_spec(variant: str = "smolvlm", longest_edge: int | None = None) -> dict[str, Any]:
    """Backbone spec of a full-size random-init model (``EmbedderConfig(family="idefics3", backbone=...)``)."""
    spec: dict[str, Any] = {"base": RANDOM_FULL, "variant": variant}
    if longest_edge is not None:
        spec["longest_edge"] = longest_edge
    return spec
