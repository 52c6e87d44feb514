"""Reader for image–caption folders laid out like ``shared/data/flickr8k-1k``.

The folder holds ``images/``, ``captions.csv`` (``image,caption``; several rows per
image) and optionally ``splits.csv`` (``image,split``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from magic_mm.errors import UserError


@dataclass
class CaptionedImage:
    image: str  # file name inside images/
    path: Path
    captions: list[str] = field(default_factory=list)
    split: str | None = None


def read_captioned_images(folder: str | Path, split: str | None = None) -> list[CaptionedImage]:
    """Images with their captions, in file order; ``split`` keeps one split only."""
    root = Path(folder)
    captions_csv = root / "captions.csv"
    if not captions_csv.is_file():
        raise UserError(f"{root}: no captions.csv; point at a folder with images/ and captions.csv")
    items: dict[str, CaptionedImage] = {}
    with captions_csv.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"image", "caption"} <= set(reader.fieldnames or []):
            raise UserError(f"{captions_csv}: needs the columns image,caption; found {reader.fieldnames}")
        for row in reader:
            name = row["image"]
            item = items.setdefault(name, CaptionedImage(name, root / "images" / name))
            item.captions.append(row["caption"].strip())
    splits_csv = root / "splits.csv"
    if splits_csv.is_file():
        with splits_csv.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row["image"] in items:
                    items[row["image"]].split = row["split"]
    result = list(items.values())
    if split is not None:
        known = sorted({i.split for i in result if i.split})
        result = [i for i in result if i.split == split]
        if not result:
            raise UserError(f"{root}: no images in split {split!r}; known splits: {', '.join(known) or 'none'}")
    return result
