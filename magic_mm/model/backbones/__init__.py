"""Backbone families, one file each, behind the interface in ``base.py``."""

from __future__ import annotations

from magic_mm.errors import ModelFolderError
from magic_mm.model.backbones.base import Backbone
from magic_mm.model.backbones.composed import ComposedBackbone
from magic_mm.model.backbones.internvl import InternVLBackbone

FAMILIES: dict[str, type[Backbone]] = {
    ComposedBackbone.family: ComposedBackbone,
    InternVLBackbone.family: InternVLBackbone,
}


def backbone_class(family: str) -> type[Backbone]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ModelFolderError(
            f"unknown backbone family {family!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


__all__ = ["Backbone", "FAMILIES", "backbone_class"]
