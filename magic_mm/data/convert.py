"""Converters from plain datasets to MMEB-layout task records (see ``mmeb.py``).

* An image–caption folder (``images/``, ``captions.csv``, ``splits.csv``, like
  ``shared/data/flickr8k-1k``) becomes a text→image task (one row per caption,
  candidates are images) and an image→text task (one row per image, candidates
  are captions, all of the image's own captions are positives).  The other
  captions of the same image are never negatives.
* An image–label CSV (``image,label``) becomes a classification task whose
  candidates are the label names, the true label first.

Record image paths are relative to the returned image root.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from magic_mm.data.captions import read_captioned_images
from magic_mm.data.csv_input import read_csv_rows
from magic_mm.errors import UserError

Direction = Literal["t2i", "i2t"]
DIRECTIONS: tuple[str, ...] = ("t2i", "i2t")

# Per-side instructions, worded as VLM2Vec / the paper word them for these task types.
INSTRUCTIONS: dict[str, tuple[str, str]] = {
    "t2i": ("Find me an everyday image that matches the given query.", "Represent the given image."),
    "i2t": ("Find an image caption describing the given everyday image.", ""),
    "classification": ("Represent the given image for classification.", ""),
}


@dataclass
class ConvertedTask:
    records: list[dict[str, Any]]
    image_root: Path


def _sample(pool: list[Any], count: int | None, rng: random.Random) -> list[Any]:
    """All of ``pool`` (``count`` None) or ``count`` of them, drawn without replacement."""
    if count is None or count >= len(pool):
        return list(pool)
    return rng.sample(pool, count)


def caption_task(
    folder: str | Path,
    split: str | None,
    direction: Direction,
    candidates: int | None = None,
    seed: int = 0,
) -> ConvertedTask:
    """Text→image or image→text retrieval over one split of an image–caption folder.

    ``candidates`` is the number of candidates per query, positives included
    (None: the whole split).  Negatives are drawn with ``seed``, so the task is
    the same on every run.
    """
    if direction not in DIRECTIONS:
        raise UserError(f"direction {direction!r}: use t2i (text→image) or i2t (image→text)")
    items = read_captioned_images(folder, split)
    root = Path(folder) / "images"
    rng = random.Random(seed)
    q_inst, c_inst = INSTRUCTIONS[direction]
    records: list[dict[str, Any]] = []
    if direction == "t2i":
        if candidates is not None and candidates < 2:
            raise UserError(f"--candidates {candidates}: a text→image query needs at least 2 candidates")
        for n, item in enumerate(items):
            others = [o.image for j, o in enumerate(items) if j != n]
            negatives = _sample(others, None if candidates is None else candidates - 1, rng)
            for caption in item.captions:
                targets = [item.image] + negatives
                records.append({
                    "qry_inst": q_inst, "qry_text": caption, "qry_img_path": "",
                    "tgt_inst": c_inst, "tgt_text": [""] * len(targets), "tgt_img_path": targets,
                })
    else:
        for n, item in enumerate(items):
            positives = list(item.captions)
            if candidates is not None and candidates <= len(positives):
                raise UserError(
                    f"--candidates {candidates}: an image has {len(positives)} captions (all positives), "
                    f"so ask for more than {len(positives)} candidates per query"
                )
            # Captions of *other* images only: the image's own captions are never negatives.
            others = [c for j, o in enumerate(items) if j != n for c in o.captions]
            negatives = _sample(others, None if candidates is None else candidates - len(positives), rng)
            texts = positives + negatives
            records.append({
                "qry_inst": q_inst, "qry_text": "", "qry_img_path": item.image,
                "tgt_inst": c_inst, "tgt_text": texts, "tgt_img_path": [""] * len(texts),
                "tgt_relevance": [1.0] * len(positives) + [0.0] * len(negatives),
            })
    return ConvertedTask(records, root)


def label_task(csv_path: str | Path, image_root: str | Path | None = None) -> ConvertedTask:
    """Classification: each image is a query; the candidates are all label names, the true one first.

    The CSV has columns ``image,label``; image paths are relative to ``image_root``
    (default: the CSV's folder).
    """
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent
    pairs = [(row["image"], row["label"]) for _, row in read_csv_rows(csv_path, ("image", "label"), optional=None)]
    labels = sorted({lab for _, lab in pairs})
    if len(labels) < 2:
        raise UserError(f"{csv_path}: found {len(labels)} distinct label(s); a classification task needs at least 2")
    q_inst, c_inst = INSTRUCTIONS["classification"]
    records = []
    for img, lab in pairs:
        names = [lab] + [other for other in labels if other != lab]
        records.append({
            "qry_inst": q_inst, "qry_text": "", "qry_img_path": img,
            "tgt_inst": c_inst, "tgt_text": names, "tgt_img_path": [""] * len(names),
        })
    return ConvertedTask(records, root)
