"""What a request may contain, and turning its parts into embedder inputs.

Every refusal is an ``ApiError`` with an HTTP status, the offending field (``param``)
and a message saying what to change; the app turns it into OpenAI's error JSON.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from magic_mm.errors import UserError
from magic_mm.model.inputs import MMInput, PreparedInput, load_image, prepare
from magic_mm.serve.batcher import BatchSettings


@dataclass
class ServeSettings:
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024  # one image, after base64 decoding
    max_image_pixels: int = 16_000_000  # width × height of one image
    max_inputs: int = 128  # inputs per /v1/embeddings call, documents per /v1/rerank call
    max_k: int = 100
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: the server never fetches)
    remote_timeout_s: float = 10.0
    rerank_top: int = 10
    batch: BatchSettings = field(default_factory=BatchSettings)
    # The served model's Backbone.decode_size (create_app sets it), for decoding large JPEGs.
    decode_size: tuple[int, int] | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "authentication_error" if self.status == 401 else (
            "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def image_from_url(url: Any, param: str, settings: ServeSettings) -> Image.Image:
    """Decode a ``data:`` URL (or fetch an http(s) URL when allowed); never open a server path."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{param}: expected an image URL string (data:image/…;base64,…)", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, f"{param}: only base64 data: URLs are accepted (data:image/png;base64,…)", param)
        if len(payload) * 3 // 4 > settings.max_image_bytes:
            raise too_large_image(param, settings)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{param}: the data: URL is not valid base64", param) from None
    elif scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise ApiError(400, f"{param}: remote image URLs are disabled on this server; send the image as a "
                                "data: URL, or start the server with --allow-remote-images", param,
                           "remote_images_disabled")
        data = fetch_image(url, param, settings)
    else:
        raise ApiError(400, f"{param}: clients cannot name files or other resources on the server "
                            f"({url[:40]!r}); send the image itself as a data:image/…;base64 URL", param,
                       "server_paths_refused")
    if len(data) > settings.max_image_bytes:
        raise too_large_image(param, settings)
    try:
        return load_image(data, param, settings.max_image_pixels, settings.decode_size)
    except UserError as exc:
        too_many = "exceeds the limit" in str(exc)
        raise ApiError(413 if too_many else 400, str(exc), param,
                       "image_too_many_pixels" if too_many else "bad_image") from None


def too_large_image(param: str, settings: ServeSettings) -> ApiError:
    return ApiError(413, f"{param}: the image is larger than the limit of {settings.max_image_bytes:,} bytes; "
                         "send a smaller image", param, "image_too_large")


def fetch_image(url: str, param: str, settings: ServeSettings) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=settings.remote_timeout_s) as response:  # noqa: S310 (opt-in)
            data = response.read(settings.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ApiError(400, f"{param}: could not fetch {url[:80]} ({exc})", param, "remote_image_failed") from None
    if len(data) > settings.max_image_bytes:
        raise too_large_image(param, settings)
    return data


def content_parts_input(parts: list[Any], param: str, settings: ServeSettings) -> MMInput:
    """A chat-format content list (``text`` and ``image_url`` parts) → one input."""
    texts, images = [], []
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or "type" not in part:
            raise ApiError(400, f"{where}: a content part is an object with a \"type\" (text or image_url)", where)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.text: expected a string", where)
            texts.append(part["text"])
        elif part["type"] == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            images.append(image_from_url(url, f"{where}.image_url.url", settings))
        else:
            raise ApiError(400, f"{where}.type: {part['type']!r} is not supported; use \"text\" or \"image_url\"",
                           where)
    if len(images) > 1:
        raise ApiError(400, f"{param}: one image per input; send several inputs instead", param)
    text = "\n".join(texts) if texts else None
    if not images and not (text and text.strip()):
        raise ApiError(400, f"{param}: the input has neither an image nor a non-empty text", param)
    return MMInput(text=text, image=images[0] if images else None, name=param)


def embedding_inputs(raw: Any, settings: ServeSettings, param: str = "input") -> list[PreparedInput]:
    """OpenAI ``input``: a string, a list of strings, or a list of content-part lists."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, f"{param}: expected a non-empty string or list of inputs", param)
    if all(isinstance(x, dict) for x in raw):
        raw = [raw]  # a single content-part list
    if len(raw) > settings.max_inputs:
        raise ApiError(413, f"{param}: {len(raw)} inputs is more than the limit of {settings.max_inputs} per "
                            "request; split it", param, "too_many_inputs")
    items = []
    for i, entry in enumerate(raw):
        where = f"{param}[{i}]"
        if isinstance(entry, str):
            if not entry.strip():
                raise ApiError(400, f"{where}: the text is empty", where)
            items.append(MMInput(text=entry, name=where))
        elif isinstance(entry, list) and entry and all(isinstance(x, int) for x in entry):
            raise ApiError(400, f"{where}: token-id inputs are not supported; send the text", where)
        elif isinstance(entry, list):
            items.append(content_parts_input(entry, where, settings))
        else:
            raise ApiError(400, f"{where}: expected a string or a list of content parts "
                                "([{\"type\":\"text\",…},{\"type\":\"image_url\",…}])", where)
    return [prepare_checked(item) for item in items]


def prepare_checked(item: MMInput) -> PreparedInput:
    try:
        return prepare(item)
    except UserError as exc:
        raise ApiError(400, str(exc), item.name) from None
