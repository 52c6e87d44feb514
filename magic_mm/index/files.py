"""What gets indexed: image files and the pages of PDF files, found under the given paths.

A *document* is one file; a *page* is one image to embed (an image file has one page,
page 0; a PDF has one per page, rendered with pypdfium2).  Documents are identified by
their resolved path and their content hash, so a changed file is noticed even when its
size and time stamp are not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from magic_mm.errors import UserError
from magic_mm.model.inputs import MAX_IMAGE_PIXELS, load_image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
PDF_SUFFIX = ".pdf"
# Pages are rendered so that their longer side is about this many pixels: enough for the
# vision encoder (448 px) and for thumbnails, without rendering posters at full size.
PDF_RENDER_LONG_SIDE = 1024


class BadDocumentError(UserError):
    """A PDF that cannot be opened or rendered."""


@dataclass(frozen=True)
class Document:
    path: Path  # resolved, absolute
    kind: str  # "image" or "pdf"


def find_documents(paths: Iterable[Path]) -> list[Document]:
    """Image and PDF files under ``paths`` (files or folders, recursively), sorted, no duplicates."""
    found: dict[Path, Document] = {}
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"{given}: no such file or folder; check the path")
        candidates: Iterator[Path] = iter([path]) if path.is_file() else path.rglob("*")
        for file in candidates:
            kind = document_kind(file)
            if kind is not None and file.is_file():
                resolved = file.resolve()
                found.setdefault(resolved, Document(resolved, kind))
        if path.is_file() and document_kind(path) is None:
            raise UserError(
                f"{given}: not an image or PDF (by its suffix); index JPEG, PNG, WebP, GIF, BMP, TIFF or PDF files"
            )
    return [found[p] for p in sorted(found)]


def document_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix == PDF_SUFFIX:
        return "pdf"
    return None


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def render_pages(doc: Document, max_pixels: int = MAX_IMAGE_PIXELS,
                 decode_size: tuple[int, int] | None = None) -> list[Image.Image]:
    """All pages of ``doc`` as RGB images; raises a ``UserError`` naming the file if it is bad.
    ``decode_size``: the model's (``Backbone.decode_size``), for ``load_image``."""
    if doc.kind == "image":
        return [load_image(doc.path, str(doc.path), max_pixels, decode_size)]
    return render_pdf(doc.path)


def render_pdf(path: Path, pages: Iterable[int] | None = None, long_side: int = PDF_RENDER_LONG_SIDE) -> list[Image.Image]:
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(str(path))
    except Exception as exc:  # pypdfium2 raises PdfiumError for damaged or encrypted files
        raise BadDocumentError(f"{path}: cannot open the PDF ({exc}); repair or remove it") from None
    try:
        if len(pdf) == 0:
            raise BadDocumentError(f"{path}: the PDF has no pages")
        images = []
        for number in range(len(pdf)) if pages is None else pages:
            page = pdf[number]
            width, height = page.get_size()  # in points (1/72 inch)
            scale = long_side / max(width, height, 1.0)
            try:
                images.append(page.render(scale=scale).to_pil().convert("RGB"))
            except Exception as exc:
                raise BadDocumentError(f"{path}: page {number + 1} cannot be rendered ({exc})") from None
            finally:
                page.close()
        return images
    finally:
        pdf.close()


def page_image(path: Path, kind: str, page: int) -> Image.Image:
    """Page ``page`` (1-based) of an indexed document, for thumbnails and reranking."""
    if kind == "pdf":
        return render_pdf(path, [page - 1])[0]
    return load_image(path, str(path))
