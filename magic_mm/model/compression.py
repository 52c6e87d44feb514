"""Parameter-free visual-token compression on a ``(B, H, W, C)`` feature grid.

The paper's operator Φ is ``bilinear``: it resamples the vision encoder's feature
map from H×W to H/s × W/s before the connector, so the LM sees s² times fewer
visual tokens.  ``avgpool`` and ``pixel_unshuffle`` are the usual alternatives;
``none`` is the identity.

Grids that do not divide by ``s``
---------------------------------
Every method maps an H×W grid to ``ceil(H/s) × ceil(W/s)`` tokens, so a 7×7 grid
with s = 2 becomes 4×4 = 16 tokens (never 3×3: no image region is dropped).

* ``bilinear`` resamples to that size (``align_corners=False``, no antialias),
  i.e. each output cell samples the input at its own centre.
* ``avgpool`` uses adaptive average pooling, whose windows overlap by one
  cell where the grid does not divide.  With s = 2 on an even grid, ``bilinear``
  at half-pixel centres averages exactly each 2×2 block, so ``bilinear:2`` and
  ``avgpool:2`` are the same operator there (they differ by float rounding, ~1e-7).
  They part ways for s ≥ 3 or odd grids: ``bilinear:4`` reads only the middle 2×2
  of each 4×4 window, ``avgpool:4`` all 16 cells.
* ``pixel_unshuffle`` zero-pads the bottom/right edge up to a multiple of ``s``
  and stacks each s×s block into the channels (C becomes C·s²), which is how
  InternVL merges 2×2 patches.  Its connector must therefore expect C·s².

A spec is written ``method`` or ``method:s`` (``bilinear:2``) or with a target
grid ``method:HxW`` (``bilinear:7x7``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from magic_mm.errors import CompressionSpecError

METHODS = ("none", "bilinear", "avgpool", "pixel_unshuffle")


@dataclass(frozen=True)
class Compression:
    """A compression method with either a factor ``s`` or a fixed target grid."""

    method: str = "none"
    factor: int = 1
    target: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CompressionSpecError(
                f"unknown compression method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if self.factor < 1:
            raise CompressionSpecError(f"compression factor must be >= 1, got {self.factor}")
        if self.target is not None and self.method == "pixel_unshuffle":
            raise CompressionSpecError(
                "pixel_unshuffle takes a factor (pixel_unshuffle:2), not a target grid"
            )
        if self.method == "none" and (self.factor != 1 or self.target is not None):
            raise CompressionSpecError("'none' takes no factor or target grid")

    @classmethod
    def parse(cls, spec: str | Compression | None) -> Compression:
        """Parse ``none``, ``bilinear``, ``bilinear:2`` or ``bilinear:7x7``."""
        if spec is None:
            return cls()
        if isinstance(spec, Compression):
            return spec
        text = str(spec).strip().lower()
        method, _, arg = text.partition(":")
        if method in ("", "none") and not arg:
            return cls()
        if method not in METHODS:
            raise CompressionSpecError(
                f"unknown compression {spec!r}; write e.g. 'bilinear:2', 'avgpool:2', "
                f"'pixel_unshuffle:2', 'bilinear:7x7' or 'none'"
            )
        if not arg:
            return cls(method, factor=2 if method != "none" else 1)
        try:
            if "x" in arg:
                h, w = (int(v) for v in arg.split("x"))
                if h < 1 or w < 1:
                    raise ValueError
                return cls(method, target=(h, w))
            return cls(method, factor=int(arg))
        except ValueError:
            raise CompressionSpecError(
                f"bad compression argument in {spec!r}; use a factor like ':2' or a grid like ':7x7'"
            ) from None

    def __str__(self) -> str:
        if self.method == "none":
            return "none"
        if self.target is not None:
            return f"{self.method}:{self.target[0]}x{self.target[1]}"
        return f"{self.method}:{self.factor}"

    @property
    def is_identity(self) -> bool:
        return self.method == "none" or (self.target is None and self.factor == 1)

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid an H×W feature grid becomes (see the module doc for rounding)."""
        if self.is_identity:
            return height, width
        if self.target is not None:
            return self.target
        return math.ceil(height / self.factor), math.ceil(width / self.factor)

    def channel_multiplier(self) -> int:
        """How many times the channel count grows (only pixel_unshuffle changes it)."""
        return self.factor**2 if self.method == "pixel_unshuffle" else 1

    def __call__(self, grid: torch.Tensor, target: tuple[int, int] | None = None) -> torch.Tensor:
        """Compress a ``(B, H, W, C)`` grid; ``target`` overrides the output grid size."""
        if grid.dim() != 4:
            raise ValueError(f"expected a (B, H, W, C) grid, got shape {tuple(grid.shape)}")
        _, h, w, _ = grid.shape
        out_h, out_w = target or self.output_grid(h, w)
        if self.method == "none" or (out_h, out_w) == (h, w) and self.method != "pixel_unshuffle":
            return grid
        if self.method == "pixel_unshuffle":
            return pixel_unshuffle(grid, self.factor)
        channels_first = grid.permute(0, 3, 1, 2)
        if self.method == "bilinear":
            out = F.interpolate(
                channels_first, size=(out_h, out_w), mode="bilinear", align_corners=False
            )
        else:
            out = F.adaptive_avg_pool2d(channels_first, (out_h, out_w))
        return out.permute(0, 2, 3, 1).contiguous()


def pixel_unshuffle(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """Space-to-depth on ``(B, H, W, C)``: zero-pad to a multiple of ``factor``, stack blocks."""
    b, h, w, c = grid.shape
    pad_h, pad_w = (-h) % factor, (-w) % factor
    if pad_h or pad_w:
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
    h2, w2 = (h + pad_h) // factor, (w + pad_w) // factor
    blocks = grid.reshape(b, h2, factor, w2, factor, c).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(b, h2, w2, factor * factor * c)
