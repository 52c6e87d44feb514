"""The paper's embedding prompts.

Query:      ``Instruct: {instruction}\\n<image>\\nQuery: {text}``
Candidate:  ``Instruct: {instruction}\\n<image>\\nText: {text}``

Absent parts (no instruction, no image, no text) are left out together with
their line break.  The prompt is returned as segments so the backbone can
splice the visual tokens in where ``<image>`` stands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["query", "candidate"]
ROLES: tuple[Role, ...] = ("query", "candidate")
TEXT_LABEL = {"query": "Query", "candidate": "Text"}

DEFAULT_INSTRUCTIONS: dict[Role, str] = {
    "query": "Find me an everyday image that matches the given query.",
    "candidate": "Represent the given image.",
}


class ImageSlot:
    """Marks where the visual tokens go in a prompt."""

    def __repr__(self) -> str:
        return "<image>"


IMAGE = ImageSlot()


@dataclass(frozen=True)
class Prompt:
    """A prompt as an ordered list of text segments and (at most one) ``IMAGE``."""

    segments: tuple[str | ImageSlot, ...]

    @property
    def has_image(self) -> bool:
        return IMAGE in self.segments

    def render(self, image_placeholder: str = "<image>") -> str:
        return "".join(image_placeholder if s is IMAGE else s for s in self.segments)


def build_prompt(role: Role, instruction: str | None, text: str | None, has_image: bool) -> Prompt:
    """Build the prompt for one input; ``instruction`` may be None or empty to omit it."""
    if role not in ROLES:
        raise ValueError(f"role must be 'query' or 'candidate', got {role!r}")
    lines: list[list[str | ImageSlot]] = []
    if instruction:
        lines.append([f"Instruct: {instruction}"])
    if has_image:
        lines.append([IMAGE])
    if text:
        lines.append([f"{TEXT_LABEL[role]}: {text}"])
    segments: list[str | ImageSlot] = []
    for i, line in enumerate(lines):
        if i:
            segments.append("\n")
        segments.extend(line)
    return Prompt(tuple(_merge_text(segments)))


def _merge_text(segments: list[str | ImageSlot]) -> list[str | ImageSlot]:
    merged: list[str | ImageSlot] = []
    for seg in segments:
        if isinstance(seg, str) and merged and isinstance(merged[-1], str):
            merged[-1] += seg
        else:
            merged.append(seg)
    return merged
