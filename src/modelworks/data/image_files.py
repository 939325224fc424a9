"""Image files -> uint8 [C, H, W] tensors, with the file's header checked before a pixel is decoded.

One decoder for every place an image file enters: serving and `modelworks predict` (through the image tasks'
predictors) and the training data readers (ImageFolder trees, detection sets). It is Pillow, restricted to the
four formats we document, because Pillow reads a file's size and frame count from its header without decoding
it: a 3.5 MB PNG can declare 60000x60000 pixels (10.8 GB decoded) and a 43-byte GIF a 20000x20000 canvas, so the
only safe order is header, limit, then decode. torchvision.io decodes first and asks later.

The limit is on pixels (width x height), which bounds the decoded size and the decoding time alike.
`default_max_pixels` derives it from the model's input size; servers and readers may set their own.
"""

from __future__ import annotations

import io
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, InputTooLarge

# Pillow's own bomb check warns above 89 MP (and raises above 179 MP, which _open turns into InputTooLarge). Every
# caller here checks its own, lower, limit and says what to do, so the warning is noise; filtered once, for this
# category only, rather than per call (catch_warnings costs more than decoding a thumbnail).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

FORMATS = ("PNG", "JPEG", "GIF", "WEBP")  # what Pillow may open here: no BMP, TIFF, PSD, ... surprises
FORMAT_NAMES = "PNG, JPEG, GIF or WebP"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
# A floor that admits a 16-megapixel photo (4608 x 3456) for any model, however small its input: a user sending
# a phone photo to a 28x28 classifier with resize=true is the normal case, not an attack. Decoded, that is 48 MB
# of RGB, the most one request can cost.
MIN_DEFAULT_MAX_PIXELS = 4608 * 3456
# Pillow's modes -> what a caller that asked for no conversion gets (channels last, then transposed).
UNCHANGED_MODES = {"1": "L", "L": "L", "LA": "LA", "P": "RGB", "PA": "RGBA", "RGB": "RGB", "RGBA": "RGBA"}
HIGH_DEPTH_MODES = ("I", "F")  # 16- and 32-bit pixels: "I", "I;16", "I;16B", ..., "F"


def default_max_pixels(model_pixels: int) -> int:
    """The pixel limit for a model whose input has `model_pixels` pixels: 64 times that (an 8x larger side), and
    never below a 16-megapixel photo."""
    return max(MIN_DEFAULT_MAX_PIXELS, 64 * int(model_pixels))


def too_large(where: str, size: str, max_pixels: int, field: str | None) -> InputTooLarge:
    """A request (`field` set) is told to send less or have the limit raised; a data set's file, to be downscaled."""
    fix = ("send a smaller image, or raise the limit with --max-image-pixels" if field else
           "downscale the file or remove it from the data set")
    return InputTooLarge(f"{where}: {size} is more than is decoded here ({max_pixels:,} pixels); {fix}", field)


def _open(source: bytes | Path | str, where: str, field: str | None, fix: str, max_pixels: int):
    """A Pillow image with only its header read. Its size may still be a bomb: the caller checks."""
    from PIL import UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputError(f"{where}: empty file; send a {FORMAT_NAMES} image", field)
        stream = io.BytesIO(source)
    else:
        stream = source
    try:
        return Image.open(stream, formats=FORMATS)
    except Image.DecompressionBombError as exc:  # past Pillow's own limit: its message has the pixel count
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(declared.group(1)):,} pixels" if declared else "the declared size"
        raise too_large(where, size, max_pixels, field) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        raise InputError(f"{where}: cannot be decoded as {FORMAT_NAMES} ({reason}); {fix}", field) from None


def read_image(source: bytes | Path | str, channels: int | None, max_pixels: int, *, where: str = "image",
               field: str | None = "image", fix: str | None = None) -> torch.Tensor:
    """An image file (its bytes, or a path) -> uint8 [C, H, W].

    `channels`: 1 (grayscale, ITU-R 601-2 luma), 3 (RGB) or None (as stored: 1, 2, 3 or 4). Refused with
    InputTooLarge, before decoding, when width x height exceeds `max_pixels`; with InputError when the file is
    empty, not one of the four formats, animated, of more than 8 bits per channel, or broken. `where` starts
    every message (a request field or a file path), `field` is the request field the error names."""
    fix = fix or f"send a {FORMAT_NAMES} image"
    with _open(source, where, field, fix, max_pixels) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise too_large(where, f"{width}x{height} pixels", max_pixels, field)
        if getattr(image, "is_animated", False):  # reads at most the second frame's header
            raise InputError(f"{where}: an animated {image.format} (more than one frame); send one still image",
                             field)
        if image.mode.startswith(HIGH_DEPTH_MODES):
            raise InputError(f"{where}: {image.mode} pixels (more than 8 bits per channel); this model takes 8-bit "
                             "images, save it with 8 bits per channel", field)
        target = {1: "L", 3: "RGB"}[channels] if channels else UNCHANGED_MODES.get(image.mode, "RGB")
        try:
            pixels = np.array(image.convert(target) if image.mode != target else image)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a header that promised more than the data
            raise InputError(f"{where}: cannot be decoded as {FORMAT_NAMES} ({exc}); {fix}", field) from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def screen_header(prefix: bytes, max_pixels: int, *, where: str = "image", field: str | None = "image") -> bool:
    """Check the first bytes of an image file against `max_pixels`, the rest not yet read: InputTooLarge past it,
    True when the header fits, False when the prefix is too short to tell or is not a header Pillow knows (the
    full read decides then)."""
    try:
        with _open(prefix, where, field, "", max_pixels) as image:
            width, height = image.size
    except InputTooLarge:
        raise
    except InputError:
        return False
    if width * height > max_pixels:
        raise too_large(where, f"{width}x{height} pixels", max_pixels, field)
    return True


def read_image_size(path: Path | str, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image file from its header, refused past `max_pixels` as read_image would."""
    with _open(path, str(path), None, "remove or replace the file", max_pixels) as image:
        width, height = image.size
    if width * height > max_pixels:
        raise too_large(str(path), f"{width}x{height} pixels", max_pixels, None)
    return width, height
