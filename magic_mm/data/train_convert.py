"""Converters that write *training* sub-datasets in VLM2Vec's MMEB-train layout.

One parquet or JSONL file per sub-dataset, one row per training pair:

=====================  =======================================================
``qry``                query text ("" when the query is an image only)
``qry_image_path``     query image, relative to the sub-dataset's image root
``pos_text``           the positive candidate's text
``pos_image_path``     the positive candidate's image
``neg_text``           a hard negative's text ("" = no negative)
``neg_image_path``     a hard negative's image
=====================  =======================================================

``""`` means absent.  Instructions are not written into the rows: they belong to
the sub-dataset and go in the mixture YAML (``query_instruction`` /
``candidate_instruction``); :data:`TRAIN_KINDS` holds the ones each converter
suggests.  ``train_layout.py`` reads these files and writes them (``write_rows``);
the *evaluation* layout, one row per query with a candidate list, is ``convert.py``'s.

The converters read a user's folder:

* ``caption_pairs``: an image–caption folder (``images/``, ``captions.csv``,
  optional ``splits.csv``) as text→image, image→text or caption→caption pairs;
* ``label_pairs``: an ``image,label`` CSV as classification-as-retrieval
  (the image against its label text; another label is the negative);
* ``pdf_pairs``: a ``pdf,page,query`` CSV over a folder of PDFs as document
  retrieval (the query against the rendered page);
* ``vqa_pairs``: an ``image,question,answer`` CSV (image + question → answer).

Every converter checks its inputs and raises :class:`~magic_mm.errors.UserError`
naming the file, line and fix.  Output is deterministic: same input and seed,
same bytes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magic_mm.data.captions import read_captioned_images
from magic_mm.data.convert import INSTRUCTIONS
from magic_mm.data.csv_input import ConvertInputError, check_images, existing_folder, read_csv_rows
from magic_mm.data.train_layout import COLUMNS
from magic_mm.errors import UserError

CAPTION_DIRECTIONS = ("t2i", "i2t", "t2t")


@dataclass(frozen=True)
class TrainKind:
    """A kind of training sub-dataset: the instructions its mixture entry should carry."""

    query_instruction: str
    candidate_instruction: str
    meaning: str


TRAIN_KINDS: dict[str, TrainKind] = {
    "t2i": TrainKind(*INSTRUCTIONS["t2i"], "caption → image"),
    "i2t": TrainKind(*INSTRUCTIONS["i2t"], "image → caption"),
    "t2t": TrainKind("Retrieve another caption of the same everyday image as the given caption.", "",
                     "caption → another caption of the same photo"),
    "classification": TrainKind(*INSTRUCTIONS["classification"], "image → its label text"),
    "document": TrainKind("Find the document page that answers the given query.", "Represent the given document page.",
                          "query → PDF page image"),
    "vqa": TrainKind("Answer the question about the given image.", "", "image + question → answer"),
}


@dataclass
class TrainSet:
    """Converted rows (dicts with :data:`COLUMNS`), their image root and their kind."""

    rows: list[dict[str, str]]
    image_root: Path
    kind: str
    notes: dict[str, Any] = field(default_factory=dict)


def pair(qry: str = "", qry_image: str = "", pos_text: str = "", pos_image: str = "",
         neg_text: str = "", neg_image: str = "") -> dict[str, str]:
    return dict(zip(COLUMNS, (qry, qry_image, pos_text, pos_image, neg_text, neg_image)))


def _other(pool: Sequence[str], exclude: str, rng: random.Random) -> str:
    """A member of ``pool`` other than ``exclude``, drawn with ``rng``."""
    choice = rng.randrange(len(pool) - 1)
    return pool[choice] if pool[choice] != exclude else pool[-1]


# --- the converters ---------------------------------------------------------------------------


def caption_pairs(folder: str | Path, direction: str, split: str | None = None) -> TrainSet:
    """An image–caption folder as training pairs.

    * ``t2i``: one row per caption, the caption against its photo (the photo's other
      captions share that positive, and the trainer never uses a shared positive as a
      negative);
    * ``i2t``: one row per photo, the photo against one of its captions;
    * ``t2t``: one row per photo with two captions or more, one caption against another.

    ``i2t`` and ``t2t`` keep one row per photo because two rows of the same photo in one
    batch would each have the other's caption as a (false) in-batch negative.  Photo ``n``
    (in file order) uses caption ``n mod k`` (i2t) and captions ``n mod k`` → ``n+1 mod k``
    (t2t) of its ``k``, so every caption position is used across the set.
    """
    if direction not in CAPTION_DIRECTIONS:
        raise ConvertInputError(f"--direction {direction!r}: use t2i (caption → image), i2t (image → caption) "
                                "or t2t (caption → another caption of the same photo)")
    folder = existing_folder(folder, "image–caption folder")
    items = read_captioned_images(folder, split)
    if not items:
        raise ConvertInputError(f"{folder / 'captions.csv'}: no captions; add rows image,caption")
    root = folder / "images"
    check_images(((f"captions.csv, image {item.image}", item.image) for item in items), root,
                 flag="the folder argument (its images/ subfolder)")
    rows: list[dict[str, str]] = []
    for n, item in enumerate(items):
        captions = [c for c in item.captions if c]
        k = len(captions)
        if direction == "t2i":
            rows += [pair(qry=caption, pos_image=item.image) for caption in captions]
        elif direction == "i2t" and k:
            rows.append(pair(qry_image=item.image, pos_text=captions[n % k]))
        elif direction == "t2t" and k >= 2:
            rows.append(pair(qry=captions[n % k], pos_text=captions[(n + 1) % k]))
    if not rows:
        raise ConvertInputError(f"{folder}: no {direction} pairs (t2t needs photos with two captions or more); "
                                "check captions.csv")
    return TrainSet(rows, root, direction, {"images": len(items)})


def label_pairs(csv_path: str | Path, image_root: str | Path | None = None, seed: int = 0) -> TrainSet:
    """An ``image,label`` CSV as classification pairs: the image, its label text as the
    positive, and another label (drawn with ``seed``) as the negative."""
    csv_path = Path(csv_path)
    root = existing_folder(image_root, "image root") if image_root is not None else csv_path.parent
    rows_in = read_csv_rows(csv_path, ("image", "label"), ("score",))
    check_images(((f"{csv_path.name}, line {n}", row["image"]) for n, row in rows_in), root)
    labels = sorted({row["label"] for _, row in rows_in})
    if len(labels) < 2:
        raise ConvertInputError(f"{csv_path}: found {len(labels)} distinct label(s); classification needs at least 2")
    rng = random.Random(seed)
    rows = [pair(qry_image=row["image"], pos_text=row["label"], neg_text=_other(labels, row["label"], rng))
            for _, row in rows_in]
    return TrainSet(rows, root, "classification", {"labels": len(labels)})


def vqa_pairs(csv_path: str | Path, image_root: str | Path | None = None) -> TrainSet:
    """An ``image,question,answer`` CSV: image + question as the query, the answer as the positive."""
    csv_path = Path(csv_path)
    root = existing_folder(image_root, "image root") if image_root is not None else csv_path.parent
    rows_in = read_csv_rows(csv_path, ("image", "question", "answer"))
    check_images(((f"{csv_path.name}, line {n}", row["image"]) for n, row in rows_in), root)
    rows = [pair(qry=row["question"], qry_image=row["image"], pos_text=row["answer"]) for _, row in rows_in]
    return TrainSet(rows, root, "vqa")


def pdf_pairs(csv_path: str | Path, pdf_root: str | Path | None, pages_dir: str | Path) -> TrainSet:
    """A ``pdf,page,query`` CSV (``page`` 1-based) as document retrieval pairs.

    Each referenced page is rendered once (as ``magic-mm index`` renders PDF pages)
    to ``pages_dir/<pdf path without .pdf>/page-<n>.png``; ``pages_dir`` is the image root.
    """
    from magic_mm.index.files import render_pdf  # the indexer's page rendering, reused as is

    csv_path = Path(csv_path)
    root = existing_folder(pdf_root, "PDF folder") if pdf_root is not None else csv_path.parent
    rows_in = read_csv_rows(csv_path, ("pdf", "page", "query"))
    pages: dict[str, dict[int, int]] = {}  # pdf → page → first line asking for it
    for number, row in rows_in:
        if not row["page"].isdigit() or int(row["page"]) < 1:
            raise ConvertInputError(f"{csv_path}, line {number}: page {row['page']!r} is not a page number; "
                                    "pages are numbered from 1")
        pages.setdefault(row["pdf"], {}).setdefault(int(row["page"]), number)
    check_images(((f"{csv_path.name}, line {min(p.values())}", name) for name, p in pages.items()), root,
                 flag="--pdf-root", what="PDF")
    out_root = Path(pages_dir)
    names: dict[tuple[str, int], str] = {}
    for name in sorted(pages):
        stem = Path(name).with_suffix("").as_posix()
        for page in sorted(pages[name]):
            rel = f"{stem}/page-{page:04d}.png"
            target = out_root / rel
            try:
                image = render_pdf(root / name, [page - 1])[0]
            except UserError:
                raise
            except Exception:  # pypdfium2 fails to load a page past the end
                raise ConvertInputError(f"{csv_path}, line {pages[name][page]}: {root / name} has no page {page}; "
                                        "fix the page number (pages are numbered from 1)") from None
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            names[(name, page)] = rel
    rows = [pair(qry=row["query"], pos_image=names[(row["pdf"], int(row["page"]))]) for _, row in rows_in]
    return TrainSet(rows, out_root, "document", {"pdfs": len(pages), "pages": len(names)})


# --- the mixture entry a converter suggests ---------------------------------------------------


def mixture_entry(name: str, out: Path, train_set: TrainSet, weight: float = 1.0) -> dict[str, Any]:
    """The mixture-YAML entry for a written sub-dataset (paths as given, not resolved)."""
    kind = TRAIN_KINDS[train_set.kind]
    return {"name": name, "file": str(out), "image_root": str(train_set.image_root), "weight": weight,
            "query_instruction": kind.query_instruction, "candidate_instruction": kind.candidate_instruction}
