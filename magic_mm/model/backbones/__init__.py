"""Backbone families, one file each, behind the interface in ``base.py``."""

from __future__ import annotations

from magic_mm.errors import ModelFolderError
from magic_mm.model.backbones.base import Backbone
from magic_mm.model.backbones.composed import ComposedBackbone
from magic_mm.model.backbones.idefics3 import Idefics3Backbone
from magic_mm.model.backbones.internvl import InternVLBackbone
from magic_mm.model.backbones.qwen_vl import QwenVLBackbone

FAMILIES: dict[str, type[Backbone]] = {
    ComposedBackbone.family: ComposedBackbone,
    InternVLBackbone.family: InternVLBackbone,
    QwenVLBackbone.family: QwenVLBackbone,
    Idefics3Backbone.family: Idefics3Backbone,
}


def backbone_class(family: str) -> type[Backbone]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ModelFolderError(
            f"unknown backbone family {family!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


def checkpoint_family(model_type: str | None) -> str | None:
    """The family that loads a raw transformers checkpoint of this ``model_type``, if any."""
    for family, cls in FAMILIES.items():
        if model_type is not None and model_type in (family, *cls.checkpoint_types):
            return family
    return None


__all__ = ["Backbone", "FAMILIES", "backbone_class", "checkpoint_family"]
