"""Image files sent to a predictor: base64 text or raw bytes -> a uint8 [C, H, W] tensor, or an InputError that
names the request field and the fix. Shared by the image tasks' predictors (classification, detection), so every
image model refuses a bad file with the same words.
"""

from __future__ import annotations

import base64
import binascii
import re

import torch

from ..errors import InputError

# What torchvision.io.decode_image reads; the same list the ImageFolder loader accepts.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
FORMATS = "PNG, JPEG, GIF or WebP"


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


def decode_image_file(data: bytes, mode, fix: str, field: str = "image") -> torch.Tensor:
    """An image file's content -> uint8 [C, H, W] with torchvision.io.decode_image in `mode` (an ImageReadMode).
    Empty, undecodable, animated and non-8-bit files raise InputError; `fix` ends the undecodable message."""
    from torchvision.io import decode_image

    if not data:
        raise InputError(f"{field}: empty file; send a {FORMATS} image", field)
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = decode_image(encoded, mode=mode)
    except (RuntimeError, ValueError) as exc:
        # torchvision prefixes its reason with a C++ source location: keep the reason only.
        reason = re.split(r"\.cpp:\d+, ", str(exc).splitlines()[0] if str(exc) else "")[-1][:120]
        raise InputError(f"{field}: cannot be decoded as {FORMATS} ({reason or type(exc).__name__}); {fix}",
                         field) from None
    if image.ndim == 4:  # an animated GIF decodes to frames
        if image.shape[0] != 1:
            raise InputError(f"{field}: an animation of {image.shape[0]} frames; send one still image", field)
        image = image[0]
    if image.dtype != torch.uint8:
        raise InputError(f"{field}: {str(image.dtype).replace('torch.', '')} pixels; this model takes 8-bit "
                         "images, save it with 8 bits per channel", field)
    return image
