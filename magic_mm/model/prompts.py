"""The paper's embedding prompts.

Query:      ``Instruct: {instruction}\\n<image>\\nQuery: {text}``
Candidate:  ``Instruct: {instruction}\\n<image>\\nText: {text}``

Absent parts (no instruction, no image, no text) are left out together with
their line break.  The prompt is returned as segments so the backbone can
splice the visual tokens in where ``<image>`` stands.  The instruction line is a
segment of its own: it opens every prompt of a task, so its LM states are computed
once and reused (``lm_batch.PrefixStates``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["query", "candidate"]
ROLES: tuple[Role, ...] = ("query", "candidate")
TEXT_LABEL = {"query": "Query", "candidate": "Text"}
INSTRUCT_LABEL = "Instruct: "

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
    lines: list[str | ImageSlot] = []
    if has_image:
        lines.append(IMAGE)
    if text:
        lines.append(f"{TEXT_LABEL[role]}: {text}")
    body: list[str | ImageSlot] = []
    for i, line in enumerate(lines):
        if i:
            body.append("\n")
        body.append(line)
    if not instruction:
        return Prompt(tuple(_merge_text(body)))
    if not body:
        return Prompt((f"{INSTRUCT_LABEL}{instruction}",))
    # Not merged with what follows: tokenised alone it gives the same ids (a BPE pre-tokeniser
    # splits at the line break) and can be looked up as a shared opening.
    return Prompt((f"{INSTRUCT_LABEL}{instruction}\n", *_merge_text(body)))


def shared_opening(segments: Sequence[object]) -> str | None:
    """The instruction line that opens ``segments`` (a prompt's, images spliced in or not) and
    is followed by more, or None.  Every input of a task starts with the same one."""
    if len(segments) < 2:
        return None
    first = segments[0]
    if isinstance(first, str) and first.startswith(INSTRUCT_LABEL) and first.endswith("\n"):
        return first
    return None


def _merge_text(segments: list[str | ImageSlot]) -> list[str | ImageSlot]:
    merged: list[str | ImageSlot] = []
    for seg in segments:
        if isinstance(seg, str) and merged and isinstance(merged[-1], str):
            merged[-1] += seg
        else:
            merged.append(seg)
    return merged
