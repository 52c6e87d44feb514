"""``qwen_vl``: Qwen2-VL, Qwen2.5-VL and Qwen3-VL through transformers' own classes.

Pipeline per image: Qwen2-VL image processor (PIL backend, no torchvision) →
vision tower on a variable-resolution patch sequence (``image_grid_thw``) →
**compression** on the h×w patch grid → the family's own 2×2 patch merger (and,
for Qwen3-VL, its DeepStack mergers) → LM with 3-D multimodal rotary positions.

Token budget
------------
The processor resizes an image, keeping its aspect ratio, so that both sides are
multiples of ``patch × merge`` (28 px; 32 px for Qwen3-VL) and its pixel count lies
in [``min_pixels``, ``max_pixels``].  Both are spec keys next to compression, so a
user can trade resolution and compression separately:
``EmbedderConfig(family="qwen_vl", backbone={"base": folder, "max_pixels": 448*448},
compression="bilinear:2")``.  Without compression an image costs (h/2)·(w/2) tokens.

Grids that do not divide by the factor
--------------------------------------
The merger needs 2×2 blocks, so the compressed grid ``ceil(h/s) × ceil(w/s)`` is
rounded *up* to the next even size (the same rule as InternVL): a 32×24 patch grid
with s = 2 → 16×12 → 8×6 = 48 tokens; a 34×34 grid → 17×17 → 18×18 → 81 tokens.
``pixel_unshuffle`` is refused: the merger already merges 2×2 patches that way
and expects exactly one such merge's channels.

Window ordering (Qwen2.5-VL)
----------------------------
Qwen2.5-VL's tower permutes 2×2 merge units into attention windows and only
undoes that after its merger.  Its pre-merger states therefore come out in window
order; they are put back into the processor's order with the inverse of the
tower's own ``window_index`` before the grid is rebuilt.  Compression thus always
sees the image's true row-major layout, and windows never leak into the result.

M-RoPE positions
----------------
The processor emits patches block-major (each 2×2 merge unit contiguous); the grid
is rebuilt row-major, compressed, and re-blocked for the merger.  The LM then sees
the *compressed* grid: ``image_grid_thw`` becomes (1, h', w') and
``mm_token_type_ids`` marks exactly the (h'/2)·(w'/2) spliced visual tokens, and
both go to the model's own ``get_rope_index``.  Visual tokens thus get temporal /
row / column positions on the compressed grid, and the text after an image
resumes at ``start + max(h', w')/2``, as for a natively smaller image.  Pads get
position 0 and are masked, so batching does not change a result.  Qwen3-VL's
DeepStack features are compressed with the same operator and added at the same
visual positions.

The feature map is read from the tower's per-block hidden states, so the tower's
own merger also runs once on the uncompressed states (about 1% of the tower's
work) and its output is discarded; benchmarks include that cost at every s.
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
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Variant:
    model_class: str  # transformers class name
    config_class: str
    windows: bool  # Qwen2.5-VL window attention
    deepstack: bool  # Qwen3-VL DeepStack features
    mean: tuple[float, ...]
    std: tuple[float, ...]


VARIANTS: dict[str, Variant] = {
    "qwen2_vl": Variant("Qwen2VLForConditionalGeneration", "Qwen2VLConfig", False, False, CLIP_MEAN, CLIP_STD),
    "qwen2_5_vl": Variant("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", True, False, CLIP_MEAN, CLIP_STD),
    "qwen3_vl": Variant("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", False, True, (0.5,) * 3, (0.5,) * 3),
}


class QwenVLBackbone(Backbone):
    family = "qwen_vl"
    image_wrap = ("<|vision_start|>", "<|vision_end|>")
    checkpoint_types = tuple(VARIANTS)

    def __init__(self, spec: dict[str, Any], compression: Compression, model: nn.Module, tokenizer: Any,
                 processor: Any, variant: str) -> None:
        if compression.method == "pixel_unshuffle":
            raise CompressionSpecError(
                "Qwen-VL's merger already merges 2×2 patches by concatenation; use bilinear or avgpool"
            )
        super().__init__(spec, compression)
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.variant = variant
        self.kind = VARIANTS[variant]
        vision = model.config.vision_config
        self.patch_size = int(vision.patch_size)
        self.merge = int(vision.spatial_merge_size)
        for name, p in self.visual.named_parameters():
            p.requires_grad_(name.startswith(("merger.", "deepstack_merger_list.")))

    # -- construction ---------------------------------------------------------------
    @classmethod
    def build(cls, spec: dict[str, Any], compression: Compression) -> QwenVLBackbone:
        import transformers
        from transformers import AutoTokenizer

        base = spec.get("base")
        if base in (TINY, RANDOM_FULL):
            variant = str(spec.get("variant", "qwen2_vl"))
            if variant not in VARIANTS:
                raise ModelFolderError(f"unknown qwen_vl variant {variant!r}; choose one of {', '.join(VARIANTS)}")
            config = tiny_config(variant) if base == TINY else full_size_config(variant)
            from magic_mm.model.tiny import byte_tokenizer, byte_tokenizer_with

            # Full-size vocabularies have room for the image markers as single tokens, as in Qwen's own.
            tokenizer = byte_tokenizer() if base == TINY else byte_tokenizer_with(list(cls.image_wrap))
            torch.manual_seed(0)
            model = getattr(transformers, VARIANTS[variant].model_class)(config).eval()
            kind = VARIANTS[variant]
            processor = _processor(None, config, kind, spec, default_max_pixels=224 * 224 if base == TINY else None)
            return cls(spec, compression, model, tokenizer, processor, variant)
        folder = Path(str(base)) if base else None
        if folder is None or not (folder / "config.json").is_file():
            raise ModelFolderError(
                f"{base}: Qwen-VL checkpoint folder not found (needs config.json, weights and tokenizer "
                "files); download Qwen2-VL / Qwen2.5-VL / Qwen3-VL in transformers format and pass its folder"
            )
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type not in VARIANTS:
            raise ModelFolderError(
                f"{folder}: model_type is {model_type!r}; the qwen_vl family loads {', '.join(VARIANTS)}"
            )
        kind = VARIANTS[model_type]
        model = getattr(transformers, kind.model_class).from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        processor = _processor(folder, model.config, kind, spec)
        return cls(spec, compression, model, tokenizer, processor, model_type)

    @classmethod
    def tiny_spec(cls) -> dict[str, Any]:
        return {"base": TINY, "variant": "qwen2_vl"}

    # -- sizes ----------------------------------------------------------------------
    def tiles_for_size(self, width: int, height: int) -> list[tuple[int, int]]:
        """One "tile": the image at its processor size (both sides multiples of patch × merge)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        size = self.processor.size
        h, w = smart_resize(height, width, factor=self.patch_size * self.merge,
                            min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return [(w, h)]

    def feature_grid_size(self, tile_height: int, tile_width: int) -> tuple[int, int]:
        return tile_height // self.patch_size, tile_width // self.patch_size

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.compression.output_grid(height, width)
        m = self.merge
        return -(-h // m) * m, -(-w // m) * m  # round up to whole merge blocks

    def tokens_per_grid(self, height: int, width: int) -> int:
        return (height // self.merge) * (width // self.merge)

    # -- the pipeline ---------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    def image_tiles(self, image: Image.Image) -> torch.Tensor:
        """``(1, 3, H, W)`` normalised pixels at the processor's size for this image."""
        batch = self.processor(images=[image], return_tensors="pt")
        _, gh, gw = (int(v) for v in batch["image_grid_thw"][0])
        m, p = self.merge, self.patch_size
        # Undo the processor's block-major patch layout: (gh/m, gw/m, m, m, C, T, p, p).
        patches = batch["pixel_values"].reshape(gh // m, gw // m, m, m, 3, -1, p, p)[:, :, :, :, :, 0]
        return patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(1, 3, gh * p, gw * p)

    def _patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(3, H, W)`` → the processor's block-major ``(n, 3·T·p·p)`` patch rows."""
        m, p = self.merge, self.patch_size
        t = int(self.model.config.vision_config.temporal_patch_size)
        gh, gw = pixels.shape[1] // p, pixels.shape[2] // p
        x = pixels.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, t, -1, -1)  # a still image fills T frames
        return x.reshape(gh * gw, -1)

    def _to_raster(self, states: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``(T, h·w, C)`` in merge-block order → ``(T, h, w, C)`` row-major grids."""
        m = self.merge
        t = states.shape[0]
        return states.reshape(t, h // m, w // m, m, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(t, h, w, -1)

    def _to_blocks(self, grid: torch.Tensor) -> torch.Tensor:
        """``(T, h, w, C)`` row-major grids → ``(T, h·w, C)`` in merge-block order."""
        t, h, w, c = grid.shape
        m = self.merge
        return grid.reshape(t, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5).reshape(t, h * w, c)

    def vision_grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` → ``(T, h, w, (1 + k)·C)``: Qwen3-VL's k DeepStack levels ride along as
        extra channels, so compression (channel-wise) treats every level alike."""
        tiles, _, height, width = pixels.shape
        h, w = height // self.patch_size, width // self.patch_size
        patches = torch.cat([self._patchify(tile) for tile in pixels])
        thw = torch.tensor([[1, h, w]] * tiles, device=pixels.device)
        out = self.visual(patches, grid_thw=thw, output_hidden_states=self.kind.deepstack, return_dict=True)
        levels = [out.last_hidden_state]
        if self.kind.deepstack:  # hidden_states[0] is the patch embedding; block i is at i + 1
            levels += [out.hidden_states[i + 1] for i in self.visual.deepstack_visual_indexes]
        if self.kind.windows:
            levels = [self._unwindow(level, thw) for level in levels]
        states = torch.cat(levels, dim=-1)  # processor (merge-block) order
        return self._to_raster(states.reshape(tiles, h * w, -1), h, w)

    def _unwindow(self, states: torch.Tensor, thw: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL: window order → processor order, per 2×2 merge unit."""
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            thw, spatial_merge_size=self.merge, window_size=self.visual.window_size, patch_size=self.patch_size
        )
        unit = self.merge**2
        units = states.reshape(-1, unit, states.shape[-1])
        return units[torch.argsort(window_index.to(states.device))].reshape(states.shape)

    def _merge(self, grid: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Compressed ``(T, h, w, (1 + k)·C)`` → merger tokens ``(T, h·w/4, D)``, and k such DeepStack tensors."""
        mergers = [self.visual.merger]
        if self.kind.deepstack:
            mergers += list(self.visual.deepstack_merger_list)
        levels = grid.chunk(len(mergers), dim=-1)
        tiles = grid.shape[0]
        merged = []
        for merger, level in zip(mergers, levels):
            rows = self._to_blocks(level).reshape(-1, level.shape[-1]).contiguous()  # the merger views 4 rows as one
            merged.append(merger(rows).reshape(tiles, -1, self.hidden_size))
        return merged[0], merged[1:]

    def connect(self, grid: torch.Tensor) -> torch.Tensor:
        return self._merge(grid)[0]

    def vision_features(self, images: Sequence[Image.Image]) -> list[VisionGrid]:
        """One vision call per image: their sizes differ."""
        return [VisionGrid(self.vision_grid(self.image_tiles(image).to(self.device, self.dtype))) for image in images]

    def image_tokens(self, grids: list[VisionGrid]) -> list[ImageTokens]:
        """Merger tokens per image, with its compressed grid (for M-RoPE) and DeepStack features."""
        out = []
        for vision in grids:
            grid = vision.features.to(self.device, self.dtype)
            grid = self.compression(grid, target=self.token_grid(grid.shape[1], grid.shape[2]))
            main, deepstack = self._merge(grid)
            embeds = main.reshape(-1, main.shape[-1])
            out.append(ImageTokens(embeds, self.image_wrap, (len(embeds),), grid_thw=(1, grid.shape[1], grid.shape[2]),
                                   deepstack=tuple(d.reshape(-1, d.shape[-1]) for d in deepstack)))
        return out

    def position_ids(self, attention_mask: torch.Tensor, visual_mask: torch.Tensor,
                     images: Sequence[ImageTokens]) -> torch.Tensor:
        """3-D rotary positions on the compressed grids, from the model's own ``get_rope_index``."""
        if not images:
            return super().position_ids(attention_mask, visual_mask, images)  # text only: what the model would use
        for image in images:
            _, h, w = image.grid_thw
            if len(image.embeds) != self.tokens_per_grid(h, w):
                raise ValueError(f"image of {len(image.embeds)} tokens does not match its {h}×{w} grid")
        positions, _ = self.model.model.get_rope_index(
            input_ids=torch.zeros_like(attention_mask), mm_token_type_ids=visual_mask.long(),
            image_grid_thw=torch.tensor([image.grid_thw for image in images], device=attention_mask.device),
            attention_mask=attention_mask,
        )
        return positions

    def decoder_kwargs(self, visual_mask: torch.Tensor, images: Sequence[ImageTokens]) -> dict[str, Any]:
        """Qwen3-VL adds each DeepStack level's features at the visual positions, in mask order."""
        if not self.kind.deepstack or not images:
            return {}
        levels = len(self.visual.deepstack_visual_indexes)
        return {"visual_pos_masks": visual_mask,
                "deepstack_visual_embeds": [torch.cat([image.deepstack[level] for image in images])
                                            for level in range(levels)]}

    # -- parts ----------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def trainable_modules(self) -> dict[str, nn.Module]:
        modules = {"merger": self.visual.merger}
        if self.kind.deepstack:
            modules["deepstack_mergers"] = self.visual.deepstack_merger_list
        return modules

    def describe_parts(self) -> dict[str, Any]:
        size = self.processor.size
        merger_params = sum(count_parameters(m) for m in self.trainable_modules().values())
        return {
            "vision": {"name": f"{self.variant} vision tower",
                       "parameters": count_parameters(self.visual) - merger_params,
                       "patch_size": self.patch_size, "min_pixels": size["shortest_edge"],
                       "max_pixels": size["longest_edge"]},
            "connector": {"name": "2×2 patch merger" + (" + deepstack" if self.kind.deepstack else ""),
                          "parameters": merger_params},
            "lm": {"name": self.model.config.text_config.model_type, "parameters": count_parameters(self.decoder),
                   "hidden_size": self.model.config.text_config.hidden_size},
        }


def _processor(folder: Path | None, config: Any, kind: Variant, spec: dict[str, Any],
               default_max_pixels: int | None = None) -> Any:
    """transformers' PIL Qwen2-VL image processor (no torchvision), with the spec's pixel budget."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = config.vision_config
    overrides: dict[str, Any] = {}
    for key in ("min_pixels", "max_pixels"):
        if spec.get(key) is not None:
            overrides[key] = int(spec[key])
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        return Qwen2VLImageProcessorPil.from_pretrained(folder, **overrides)
    if default_max_pixels is not None:
        overrides.setdefault("max_pixels", default_max_pixels)
    return Qwen2VLImageProcessorPil(
        patch_size=int(vision.patch_size), merge_size=int(vision.spatial_merge_size),
        temporal_patch_size=int(vision.temporal_patch_size), image_mean=list(kind.mean),
        image_std=list(kind.std), **overrides,
    )


def tiny_config(variant: str) -> Any:
    """A randomly initialisable config small enough for unit tests (a few seconds)."""
    import transformers

    from magic_mm.model.tiny import byte_tokenizer

    text: dict[str, Any] = {
        "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": len(byte_tokenizer()), "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
    }
    vision: dict[str, Any] = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
                              "temporal_patch_size": 2}
    if variant == "qwen2_vl":
        vision |= {"embed_dim": 32, "hidden_size": 48, "mlp_ratio": 2}
    elif variant == "qwen2_5_vl":  # 56-px windows, so test images span several windows
        vision |= {"hidden_size": 32, "out_hidden_size": 48, "intermediate_size": 64, "window_size": 56,
                   "fullatt_block_indexes": [1]}
    else:
        vision |= {"hidden_size": 32, "out_hidden_size": 48, "intermediate_size": 64, "patch_size": 16,
                   "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
        text["head_dim"] = 12
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
    tokenizer = byte_tokenizer()
    text |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": tokenizer.pad_token_id}
    return getattr(transformers, VARIANTS[variant].config_class)(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
    )


def full_size_config(variant: str = "qwen2_vl") -> Any:
    """A config with the published shapes (Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B), for timing at random init."""
    import transformers

    vocab = 151936
    if variant == "qwen2_vl":
        vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        text = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 32768,
                "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
    elif variant == "qwen2_5_vl":
        vision = {"depth": 32, "hidden_size": 1280, "out_hidden_size": 2048, "intermediate_size": 3420,
                  "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}
        text = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 128000,
                "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
    elif variant == "qwen3_vl":
        vision = {"depth": 24, "hidden_size": 1024, "out_hidden_size": 2048, "intermediate_size": 4096,
                  "num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]}
        text = {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                "num_key_value_heads": 8, "head_dim": 128, "vocab_size": vocab, "max_position_embeddings": 262144,
                "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                    "mrope_interleaved": True}}
    else:
        raise ModelFolderError(f"unknown qwen_vl variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return getattr(transformers, VARIANTS[variant].config_class)(vision_config=vision, text_config=text)


def full_size_spec(variant: str = "qwen2_vl", max_pixels: int | None = None) -> dict[str, Any]:
    """Backbone spec of a full-size random-init model (``EmbedderConfig(family="qwen_vl", backbone=...)``)."""
    spec: dict[str, Any] = {"base": RANDOM_FULL, "variant": variant}
    if max_pixels is not None:
        spec["max_pixels"] = max_pixels
    return spec
