"""Precomputed vision features: the frozen vision encoder runs once per image.

The vision encoder is frozen in every stage, so its feature grid for an image
never changes.  Training embeds the same images many times; caching the grids
(before compression, which stays in the loop) removes the encoder from the loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from magic_mm.model.backbones import Backbone
from magic_mm.model.inputs import PreparedInput, load_image
from magic_mm.progress import progress


class VisionCache:
    """Uncompressed ``(T, h, w, C)`` vision grids by image path."""

    def __init__(self) -> None:
        self.grids: dict[str, torch.Tensor] = {}

    def build(self, backbone: Backbone, paths: Sequence[str | Path], show_progress: bool = False,
              file: Path | None = None, batch_size: int = 8) -> VisionCache:
        """Compute missing grids (loading ``file`` first if it exists, saving it after)."""
        if file is not None and file.is_file():
            self.grids.update(load_file(file))
        missing = [str(p) for p in dict.fromkeys(map(str, paths)) if str(p) not in self.grids]
        with progress(len(missing), show_progress and bool(missing), "vision features") as advance:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                tiles = [backbone.image_tiles(load_image(p)) for p in chunk]
                with torch.no_grad():
                    grid = backbone.vision_grid(torch.cat(tiles).to(backbone.device, backbone.dtype))
                offset = 0
                for path, t in zip(chunk, tiles):
                    self.grids[path] = grid[offset : offset + len(t)].float().cpu().contiguous()
                    offset += len(t)
                advance(len(chunk))
        if file is not None and missing:
            file.parent.mkdir(parents=True, exist_ok=True)
            save_file(self.grids, file)
        return self

    def item(self, path: str | Path, text: str | None = None) -> PreparedInput:
        """An input whose image is the cached grid; embed it inside ``precomputed_vision``."""
        return PreparedInput(text=text, image=self.grids[str(path)], name=str(path))  # type: ignore[arg-type]


@contextmanager
def precomputed_vision(backbone: Backbone) -> Iterator[None]:
    """Let ``encode_images`` take cached grids: tiles and vision pass tensors through.

    Inside the block every image given to the backbone must be a cached grid.
    """
    def tiles(image: object) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise TypeError("inside precomputed_vision every image must be a cached grid")
        return image

    backbone.image_tiles = tiles  # type: ignore[method-assign]
    backbone.vision_grid = lambda grid: grid  # type: ignore[method-assign]
    try:
        yield
    finally:
        del backbone.image_tiles, backbone.vision_grid  # back to the class methods
