"""Image files sent to a predictor: base64 text or raw bytes -> a uint8 [C, H, W] tensor, or an InputError that
names the request field and the fix (InputTooLarge past the predictor's pixel limit, checked before decoding).
Shared by the image tasks' predictors (classification, detection), so every image model refuses a bad file with
the same words.
"""

from __future__ import annotations

import base64
import binascii

import torch

from ..data.image_files import FORMAT_NAMES as FORMATS
from ..data.image_files import IMAGE_SUFFIXES, default_max_pixels, read_image, screen_header
from ..errors import InputError

__all__ = ["FORMATS", "IMAGE_SUFFIXES", "decode_base64", "decode_image_file", "default_max_pixels", "small_file",
           "INLINE_PIXELS", "ScreensImageHeaders"]

# What a predictor may decode on the server's event loop (Predictor.parse_inline): a file of at most 64 KB (base64
# included) declaring at most 256 x 256 pixels decodes in well under 0.1 ms, less than handing it to another thread
# costs. 8-29% of throughput at 8-32 clients went to that handoff when every Fashion-MNIST request took it.
INLINE_FILE_BYTES = 64 * 1024
INLINE_PIXELS = 256 * 256


def decode_base64(text: str | None, field: str = "image") -> bytes:
    """The bytes of a base64 request field; a browser's `data:` URL prefix is accepted."""
    if not text:
        raise InputError(f"{field}: missing; send the image base64-encoded in the JSON field `{field}`, or as the "
                         f"multipart form field `{field}`", field)
    if text.startswith("data:") and "," in text:  # a data URL, as a browser's FileReader produces
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{field}: not valid base64 ({exc}); encode the file's bytes with standard base64",
                         field) from None


def small_file(request_text: str | None, file: bytes | None, field: str = "image") -> bytes | None:
    """The file's bytes when it is small enough to try decoding on the event loop, else None. The caller then
    decodes with `max_pixels` at most INLINE_PIXELS and hands an InputTooLarge to the pool instead (a small file
    may still declare many pixels)."""
    size = len(file) if file is not None else len(request_text or "")
    if size > INLINE_FILE_BYTES:
        return None
    return file if file is not None else decode_base64(request_text, field)


def decode_image_file(data: bytes, channels: int | None, fix: str, max_pixels: int, field: str = "image"
                      ) -> torch.Tensor:
    """An image file's content -> uint8 [C, H, W] (data/image_files.read_image: the header is checked against
    `max_pixels` before decoding). `channels`: 1, 3, or None for as stored; `fix` ends the undecodable message."""
    return read_image(data, channels, max_pixels, where=field, field=field, fix=fix)


class ScreensImageHeaders:
    """Predictor mixin: a server refuses an image past `max_image_pixels` from the header at the start of the upload
    (Predictor.screen_file), before reading the rest of the body. 64 KB reaches a JPEG's size marker behind the
    usual EXIF and colour profile; PNG, GIF and WebP state theirs in the first 30 bytes."""

    screen_bytes = 64 * 1024
    max_image_pixels: int | None
    file_field: str | None

    def screen_file(self, prefix: bytes) -> bool:
        if self.max_image_pixels is None:
            return True
        field = self.file_field or "image"
        return screen_header(prefix, self.max_image_pixels, where=field, field=field)
