"""Object labels for photos, read off their human captions (a classification eval set).

A photo gets label ``L`` when at least ``min_agree`` of its captions mention one of
``L``'s keywords (whole words, case-insensitive) and no other label reaches
``min_agree``; photos where two labels do (a child with a dog) are ambiguous and
dropped, and so are photos with none.  After that, labels with fewer than
``min_photos`` photos are dropped with their photos, so every remaining label has
enough photos to be measured.  The keyword list is fixed:

=========  ===================================================================
label      keywords
=========  ===================================================================
dog        dog, dogs, puppy, puppies
child      child, children, kid, kids, boy, boys, girl, girls, toddler, baby
man        man, men, guy
woman      woman, women, lady
bicycle    bike, bikes, bicycle, bicycles, biker, bikers, bmx, cyclist
ball       ball, balls
water      water, lake, river, ocean, pool, sea, wave, waves, surf
snow       snow, snowy
=========  ===================================================================

The labels are as good as the captions' agreement: nobody looked at the photos.
The result is written as an MMEB *evaluation* task (``convert.label_task``): each
photo is a query, the candidates are the label texts, the true one first.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from magic_mm.data.captions import read_captioned_images
from magic_mm.errors import UserError

KEYWORDS: dict[str, tuple[str, ...]] = {
    "dog": ("dog", "dogs", "puppy", "puppies"),
    "child": ("child", "children", "kid", "kids", "boy", "boys", "girl", "girls", "toddler", "baby"),
    "man": ("man", "men", "guy"),
    "woman": ("woman", "women", "lady"),
    "bicycle": ("bike", "bikes", "bicycle", "bicycles", "biker", "bikers", "bmx", "cyclist"),
    "ball": ("ball", "balls"),
    "water": ("water", "lake", "river", "ocean", "pool", "sea", "wave", "waves", "surf"),
    "snow": ("snow", "snowy"),
}
_PATTERNS = {label: re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE) for label, words in KEYWORDS.items()}


@dataclass
class CaptionLabels:
    pairs: list[tuple[str, str]]  # (image, label), in the folder's order
    ambiguous: int = 0  # photos where two or more labels reached min_agree
    unlabelled: int = 0  # photos where none did
    rare: dict[str, int] = field(default_factory=dict)  # dropped labels → their photo counts

    @property
    def counts(self) -> dict[str, int]:
        """Photos per kept label, most frequent first (ties by name)."""
        counter = Counter(label for _, label in self.pairs)
        return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def majority_baseline(self) -> float:
        """Accuracy of always answering the most frequent label."""
        return max(self.counts.values()) / len(self.pairs)


def mentioned(captions: list[str], min_agree: int) -> list[str]:
    """Labels that at least ``min_agree`` of ``captions`` mention."""
    return [label for label, pattern in _PATTERNS.items()
            if sum(1 for caption in captions if pattern.search(caption)) >= min_agree]


def labels_from_captions(folder: str | Path, split: str | None = "test", min_agree: int = 3,
                         min_photos: int = 5) -> CaptionLabels:
    if min_agree < 1:
        raise UserError(f"--min-agree {min_agree}: give at least 1 caption")
    items = read_captioned_images(folder, split)
    found: list[tuple[str, str]] = []
    ambiguous = unlabelled = 0
    for item in items:
        labels = mentioned(item.captions, min_agree)
        if len(labels) == 1:
            found.append((item.image, labels[0]))
        elif labels:
            ambiguous += 1
        else:
            unlabelled += 1
    counts = Counter(label for _, label in found)
    rare = {label: n for label, n in sorted(counts.items()) if n < min_photos}
    kept = [(image, label) for image, label in found if label not in rare]
    if len({label for _, label in kept}) < 2:
        raise UserError(f"{folder}: only {len(set(l for _, l in kept))} label(s) have {min_photos}+ photos "
                        f"agreed on by {min_agree}+ captions; lower --min-agree or --min-photos")
    return CaptionLabels(kept, ambiguous, unlabelled, rare)


def write_label_csv(result: CaptionLabels, path: str | Path) -> Path:
    """The ``image,label`` CSV that ``convert labels`` and ``convert train-labels`` read."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "label"])
        writer.writerows(result.pairs)
    return path
