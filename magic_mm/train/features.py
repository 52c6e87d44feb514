"""Precomputed vision features: the frozen vision encoder runs once per image.

The vision encoder is frozen in every stage, so its feature grid for an image
never changes.  Training embeds the same images many times; caching the grids
(before compression, which stays in the loop) removes the encoder from the loop.
A cached ``VisionGrid`` is an ordinary image input: ``encode_images``, the
embedder and every LM batch accept it wherever they accept a picture.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from magic_mm.model.backbones import Backbone
from magic_mm.model.backbones.base import VisionGrid
from magic_mm.model.inputs import PreparedInput, load_image
from magic_mm.progress import progress

LAYOUTS_KEY = "layouts"  # file metadata: JSON {path: layout} for families whose tiling matters (Idefics3)


class VisionCache:
    """Uncompressed vision grids (``VisionGrid``: ``(T, h, w, C)`` + tiling) by image path."""

    def __init__(self) -> None:
        self.grids: dict[str, VisionGrid] = {}

    def build(self, backbone: Backbone, paths: Sequence[str | Path], show_progress: bool = False,
              file: Path | None = None, batch_size: int = 8) -> VisionCache:
        """Compute missing grids (loading ``file`` first if it exists, saving it after)."""
        if file is not None and file.is_file():
            self.grids.update(_read(file))
        missing = [str(p) for p in dict.fromkeys(map(str, paths)) if str(p) not in self.grids]
        with progress(len(missing), show_progress and bool(missing), "vision features") as advance:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                with torch.no_grad():
                    grids = backbone.vision_features([load_image(p) for p in chunk])
                for path, grid in zip(chunk, grids):
                    self.grids[path] = VisionGrid(grid.features.float().cpu().contiguous(), grid.layout)
                advance(len(chunk))
        if file is not None and missing:
            file.parent.mkdir(parents=True, exist_ok=True)
            layouts = {path: list(g.layout) for path, g in self.grids.items() if g.layout}
            save_file({path: g.features for path, g in self.grids.items()}, file,
                      metadata={LAYOUTS_KEY: json.dumps(layouts)})
        return self

    def grid(self, path: str | Path) -> VisionGrid:
        return self.grids[str(path)]

    def item(self, path: str | Path, text: str | None = None) -> PreparedInput:
        """An input whose image is the cached grid (embeds like the image itself)."""
        return PreparedInput(text=text, image=self.grid(path), name=str(path))


def _read(file: Path) -> dict[str, VisionGrid]:
    with safe_open(file, "pt") as handle:
        layouts = json.loads((handle.metadata() or {}).get(LAYOUTS_KEY, "{}"))
    return {path: VisionGrid(features, tuple(layouts.get(path, ()))) for path, features in load_file(file).items()}
