"""Reading and checking converter inputs: CSVs with a header, folders, image files.

Shared by the evaluation converters (``convert.py``) and the training ones
(``train_convert.py``); every problem is a :class:`ConvertInputError` that names
the file (and line) and says what to fix.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

from magic_mm.errors import UserError


class ConvertInputError(UserError):
    """A converter's input folder or CSV that cannot be used."""


def read_csv_rows(path: str | Path, required: Sequence[str], optional: Sequence[str] | None = ()) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` pairs of a CSV with a header, values stripped.

    Raises a :class:`ConvertInputError` for a missing file, an empty file or one
    without rows, missing columns, columns outside ``required`` + ``optional``
    (``optional=None`` allows any extra column), and empty required values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertInputError(f"{path}: CSV not found; check the path (it needs the columns {','.join(required)})")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        if not fields:
            raise ConvertInputError(f"{path}: the CSV is empty; write a header line {','.join(required)} and one row per item")
        missing = [c for c in required if c not in fields]
        if missing:
            raise ConvertInputError(f"{path}: needs the columns {','.join(required)}; found {fields}")
        if optional is not None:
            unknown = [c for c in fields if c not in required and c not in optional]
            if unknown:
                allowed = ", ".join(list(required) + list(optional))
                raise ConvertInputError(f"{path}: unknown column(s) {', '.join(unknown)}; the columns are {allowed} "
                                        "(rename or remove the others)")
        reader.fieldnames = fields
        rows = [(number, {k: (v or "").strip() for k, v in row.items() if k is not None})
                for number, row in enumerate(reader, 2)]
    if not rows:
        raise ConvertInputError(f"{path}: the CSV has a header but no rows; add one row per item")
    empty = [number for number, row in rows if any(not row[c] for c in required)]
    if empty:
        what = ", ".join(required[:-1]) + " or " + required[-1] if len(required) > 1 else required[0]
        raise ConvertInputError(f"{path}: empty {what} on line(s) {', '.join(map(str, empty[:5]))}")
    return rows


def existing_folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConvertInputError(f"{path}: {what} not found; check the path")
    return path


def check_images(files: Iterable[tuple[str, str]], root: Path, flag: str = "--image-root", what: str = "image") -> None:
    """``files`` are ``(where, relative path)``; every one must be a file under ``root``."""
    missing = [(where, name) for where, name in files if not (root / name).is_file()]
    if missing:
        shown = "; ".join(f"{name} ({where})" for where, name in missing[:3])
        raise ConvertInputError(f"{len(missing)} {what}(s) not found under {root}: {shown}; "
                                f"set {flag} to the folder the paths are relative to, or fix the names")
