"""Caption ↔ image training pairs from an image-caption folder.

Queries are captions, candidates are images; a query's *group* is its image, so
the other captions of the same image are never used as each other's negatives.

Used by the dual-encoder baseline (``benchmarks/dual_encoder.py``).  The trainers read
every kind of data, a caption folder included, through ``train/mixture.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from magic_mm.data.captions import read_captioned_images
from magic_mm.train.config import DataConfig


@dataclass
class CaptionPairs:
    images: list[Path]  # candidates
    captions: list[str]  # queries
    owner: list[int]  # owner[q] = index of caption q's image (its positive and its group)

    @classmethod
    def load(cls, data: DataConfig) -> CaptionPairs:
        items = read_captioned_images(data.folder, data.split)
        if data.limit_images is not None:
            items = items[: data.limit_images]
        captions, owner = [], []
        for n, item in enumerate(items):
            for caption in item.captions:
                captions.append(caption)
                owner.append(n)
        return cls([i.path for i in items], captions, owner)

    def queries_per_group(self, limit: int | None) -> list[int]:
        """Query indices keeping at most ``limit`` captions of each image (all if None)."""
        seen: dict[int, int] = {}
        keep = []
        for q, g in enumerate(self.owner):
            if limit is None or seen.get(g, 0) < limit:
                keep.append(q)
                seen[g] = seen.get(g, 0) + 1
        return keep
