"""What a user may pass to ``encode``: a text, an image, or both.

Images arrive as a path, a ``PIL.Image`` or raw bytes.  They are decoded here,
once, with guards that turn every way a file can be bad into a ``BadImageError``
naming that file: missing, empty, not an image, truncated/corrupt, or so large
that decoding it would exhaust memory (a decompression bomb).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from PIL import Image, UnidentifiedImageError

from magic_mm.errors import BadImageError, BadInputError, BadTextError

if TYPE_CHECKING:
    from magic_mm.model.backbones.base import VisionGrid

ImageLike = Union[str, os.PathLike, Image.Image, bytes]

# 64 megapixels: an 8000×8000 photo still loads; a decompression bomb does not.
MAX_IMAGE_PIXELS = 64_000_000


@dataclass
class MMInput:
    """One item to embed: ``text``, ``image`` or both (an image with a text)."""

    text: str | None = None
    image: ImageLike | None = None
    name: str | None = None  # how errors refer to this item

    def describe(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.image, (str, os.PathLike)):
            return str(self.image)
        if self.image is not None:
            return f"<{type(self.image).__name__} image>"
        text = self.text or ""
        return repr(text[:40] + ("…" if len(text) > 40 else ""))


@dataclass
class PreparedInput:
    """An input after validation: a decoded RGB image and/or a non-empty text."""

    text: str | None
    image: Image.Image | VisionGrid | None  # a VisionGrid: the image's cached vision features (training)
    name: str


class PathAsTextWarning(UserWarning):
    """A ``str`` input names an existing image file; it is embedded as text, not as the image."""


# Warned once per process: a list of 10 000 path strings should not print 10 000 warnings.
_path_as_text_warned = False


def _warn_if_image_path(text: str, name: str) -> None:
    """``str`` is always text; but a ``str`` that names an image file is almost always a mistake."""
    global _path_as_text_warned
    if _path_as_text_warned or "\n" in text or len(text) > 1024:
        return
    path = Path(text).expanduser()
    if path.suffix.lower() not in Image.registered_extensions():
        return
    try:
        exists = path.is_file()
    except OSError:  # e.g. a name too long for the file system: not a path
        return
    if exists:
        _path_as_text_warned = True
        warnings.warn(
            f"{name}: this str names an image file, but a str is embedded as text (the file name), "
            f"not as the image; pass pathlib.Path({text!r}) to embed the picture "
            "(warned once per process)",
            PathAsTextWarning,
            stacklevel=3,
        )


def as_input(item: Any) -> MMInput:
    """Turn any accepted input form into an ``MMInput``.

    ``str`` is always a text; a ``pathlib.Path``, ``PIL.Image`` or ``bytes`` is an
    image; a ``(image, text)`` tuple or ``{"image": ..., "text": ...}`` dict is both.
    """
    if isinstance(item, MMInput):
        return item
    if isinstance(item, str):
        return MMInput(text=item)
    if isinstance(item, (os.PathLike, Image.Image, bytes, bytearray)):
        return MMInput(image=bytes(item) if isinstance(item, bytearray) else item)
    if isinstance(item, tuple) and len(item) == 2:
        return MMInput(image=item[0], text=item[1])
    if isinstance(item, dict) and set(item) <= {"image", "text", "name"} and item:
        return MMInput(**item)
    raise BadInputError(
        f"cannot embed an input of type {type(item).__name__}; pass a str (text), a "
        "pathlib.Path / PIL.Image / bytes (image), an (image, text) tuple or an MMInput"
    )


def load_image(source: ImageLike, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
               decode_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``source`` to an RGB ``PIL.Image`` or raise ``BadImageError`` naming it.

    ``decode_size`` (width, height): the smallest size the model needs. A JPEG at least twice
    that size on both sides is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``Image.draft``),
    never below it: a 12-megapixel photo then decodes about 6× faster. Images already decoded
    (``PIL.Image`` inputs) are used as they are."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image bytes")
    if isinstance(source, Image.Image):
        _check_pixels(source.size, label, max_pixels)
        return source.convert("RGB")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise BadImageError(f"{label}: no such file; check the path")
        if path.is_dir():
            raise BadImageError(f"{label}: is a folder, not an image file")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        raise BadInputError(f"{label}: unsupported image type {type(source).__name__}")
    if not data:
        raise BadImageError(f"{label}: the file is empty (0 bytes); re-export or remove it")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning is superseded by our explicit cap below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.size, label, max_pixels)
            if decode_size is not None and image.format == "JPEG":
                image.draft(image.mode, decode_size)
            image.load()
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(
            f"{label}: not a readable image (unknown format); use JPEG, PNG, WebP, GIF, BMP or TIFF"
        ) from None
    except Image.DecompressionBombError:
        raise BadImageError(f"{label}: image is too large to decode safely") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(
            f"{label}: the image data is corrupt or truncated ({exc}); re-export or remove it"
        ) from None
    return image.convert("RGB")


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise BadImageError(
            f"{label}: {width}×{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (possible decompression bomb); downscale the image first"
        )
    if width == 0 or height == 0:
        raise BadImageError(f"{label}: image has zero width or height")


def prepare(item: Any, index: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
            decode_size: tuple[int, int] | None = None) -> PreparedInput:
    """Validate one input: decode its image, reject empty texts (prepared inputs pass through)."""
    if isinstance(item, PreparedInput):
        return item
    mm = as_input(item)
    name = mm.describe() if index is None else f"input #{index} ({mm.describe()})"
    if isinstance(item, str):
        _warn_if_image_path(item, name)
    if mm.text is None and mm.image is None:
        raise BadInputError(f"{name}: has neither a text nor an image")
    text = mm.text
    if text is not None:
        if not isinstance(text, str):
            raise BadTextError(f"{name}: text must be a str, got {type(text).__name__}")
        if not text.strip():
            if mm.image is None:
                raise BadTextError(f"{name}: the text is empty; pass a non-empty string")
            text = None  # an image with a blank caption is just the image
    image = load_image(mm.image, name, max_pixels, decode_size) if mm.image is not None else None
    return PreparedInput(text=text, image=image, name=name)
