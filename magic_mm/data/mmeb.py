"""Tasks in the MMEB evaluation layout that VLM2Vec publishes (parquet or JSONL).

One file per task, one row per query:

========================  ==========================================================
``qry_inst``  (optional)  instruction for the query side
``qry_text``              query text ("" when the query is an image only)
``qry_img_path``          query image, relative to the task's image root ("" = none)
``tgt_inst``  (optional)  instruction for the candidate side
``tgt_text``              list: candidate texts ("" = none)
``tgt_img_path``          list: candidate images, relative to the image root
``tgt_relevance`` (opt.)  list: graded relevance per candidate (magic-mm extension)
========================  ==========================================================

The positive is always candidate 0.  Without ``tgt_relevance`` candidate 0 has
grade 1 and the others 0; with it, a row may list several positives (e.g. all
five captions of an image) and graded ones (nDCG).  An absent instruction
(missing column or null) means "the model's default for that side"; an empty
string means "no instruction".  MMEB's image placeholders in the texts
(``<|image_1|>``) are removed: the prompt builder places the image itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magic_mm.errors import UserError

REQUIRED_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
OPTIONAL_COLUMNS = ("qry_inst", "tgt_inst", "tgt_relevance")
SUFFIXES = (".parquet", ".jsonl", ".json")
_IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")


class TaskFileError(UserError):
    """A task file that is missing, unreadable, or not in the MMEB layout."""


@dataclass(frozen=True)
class Item:
    """One side of a pair as the embedder sees it; hashable, so equal items are embedded once."""

    instruction: str | None  # None = the model's default for the role
    text: str | None
    image: Path | None

    def describe(self) -> str:
        parts = []
        if self.image is not None:
            parts.append(self.image.name)
        if self.text:
            parts.append(repr(self.text[:60] + ("…" if len(self.text) > 60 else "")))
        return " + ".join(parts) or "<empty>"


@dataclass
class TaskRow:
    query: Item
    candidates: list[Item]
    grades: list[float] = field(default_factory=list)  # same length as candidates


def clean_text(text: Any) -> str | None:
    if text is None:
        return None
    cleaned = _IMAGE_PLACEHOLDER.sub("", str(text)).strip()
    return cleaned or None


def _instruction(value: Any) -> str | None:
    return None if value is None else str(value).strip()


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a parquet or JSONL file as dicts."""
    if not path.is_file():
        raise TaskFileError(f"{path}: task file not found; check the 'file' entry in the tasks YAML")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several error types
            raise TaskFileError(f"{path}: not a readable parquet file ({exc})") from None
    if path.suffix in (".jsonl", ".json"):
        records = []
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskFileError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise TaskFileError(f"{path}, line {number}: each line must be a JSON object")
                records.append(record)
        return records
    raise TaskFileError(f"{path}: unsupported task file type; use .parquet or .jsonl")


def read_task(path: str | Path, image_root: str | Path | None = None, check_images: bool = True) -> list[TaskRow]:
    """Read an MMEB-layout task; image paths are resolved against ``image_root``.

    ``image_root`` defaults to the task file's folder.  With ``check_images`` every
    referenced image must exist (the error lists the first missing ones).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    return parse_records(read_records(path), path, root, check_images)


def parse_records(records: list[dict[str, Any]], path: Path, root: Path, check_images: bool = True) -> list[TaskRow]:
    """Validate MMEB-layout records (read from ``path``) into rows; images relative to ``root``."""
    if not records:
        raise TaskFileError(f"{path}: the task has no rows")
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in records[0]]
    if missing_cols:
        raise TaskFileError(
            f"{path}: missing column(s) {', '.join(missing_cols)}; an MMEB task needs "
            f"{', '.join(REQUIRED_COLUMNS)} (and optionally {', '.join(OPTIONAL_COLUMNS)})"
        )

    def image(value: Any) -> Path | None:
        return root / str(value) if value not in (None, "") else None

    rows = []
    for number, rec in enumerate(records):
        where = f"{path}, row {number}"
        texts, images = rec.get("tgt_text"), rec.get("tgt_img_path")
        texts = list(texts) if texts is not None else []
        images = list(images) if images is not None else []
        if isinstance(rec.get("tgt_text"), str) or isinstance(rec.get("tgt_img_path"), str):
            raise TaskFileError(f"{where}: tgt_text and tgt_img_path must be lists (one entry per candidate)")
        n = max(len(texts), len(images))
        texts = texts or [None] * n
        images = images or [None] * n
        if len(texts) != len(images):
            raise TaskFileError(
                f"{where}: tgt_text has {len(texts)} entries but tgt_img_path has {len(images)}; "
                "give one entry per candidate in both (use \"\" for a missing part)"
            )
        if n == 0:
            raise TaskFileError(f"{where}: no candidates; the positive must be candidate 0")
        grades = rec.get("tgt_relevance")
        if grades is None:
            grades = [1.0] + [0.0] * (n - 1)
        elif len(grades) != n:
            raise TaskFileError(f"{where}: tgt_relevance has {len(grades)} grades for {n} candidates")
        grades = [float(g) for g in grades]
        tgt_inst = _instruction(rec.get("tgt_inst"))
        candidates = [Item(tgt_inst, clean_text(t), image(i)) for t, i in zip(texts, images)]
        query = Item(_instruction(rec.get("qry_inst")), clean_text(rec.get("qry_text")), image(rec.get("qry_img_path")))
        for label, item in [("query", query)] + [(f"candidate {j}", c) for j, c in enumerate(candidates)]:
            if item.text is None and item.image is None:
                raise TaskFileError(f"{where}: {label} has neither a text nor an image")
        rows.append(TaskRow(query, candidates, grades))
    if check_images:
        check_task_images(rows, path, root)
    return rows


def check_task_images(rows: list[TaskRow], path: Path, root: Path) -> None:
    seen: set[Path] = set()
    missing: list[str] = []
    for row in rows:
        for item in [row.query, *row.candidates]:
            if item.image is not None and item.image not in seen:
                seen.add(item.image)
                if not item.image.is_file():
                    missing.append(str(item.image))
    if missing:
        raise TaskFileError(
            f"{path}: {len(missing)} image(s) not found under the image root {root}, e.g. "
            f"{', '.join(missing[:3])}; set 'image_root' for this task to the folder the image paths are relative to"
        )


def write_task(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write MMEB-layout records (dicts with the columns above) as .jsonl or .parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # from_pylist infers columns from the first row only; give every row every column.
        columns = list(dict.fromkeys(k for rec in rows for k in rec))
        pq.write_table(pa.Table.from_pylist([{k: rec.get(k) for k in columns} for rec in rows]), path)
    elif path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as fh:
            for rec in rows:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    else:
        raise TaskFileError(f"{path}: write tasks as .jsonl or .parquet")
    return path
