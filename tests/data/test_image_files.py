"""The one image decoder (data/image_files.py): the header is checked before decoding, every outcome is a tensor of
the asked-for channels or an InputError, whatever the bytes. Property-based with hypothesis."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import gif_canvas_bomb, image_file, png_bomb
from modelworks.data.image_files import default_max_pixels, read_image, read_image_size
from modelworks.errors import InputError, InputTooLarge

FORMATS = ["PNG", "GIF", "WEBP", "JPEG"]
# image_files.py filters Pillow's bomb warning at import, for the process; pytest resets the filters per test, and
# these tests open many bombs on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@st.composite
def image_files(draw):
    """A real file in one of the four formats, of random size, channels and content."""
    height, width = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    channels = draw(st.sampled_from([1, 3]))
    format = draw(st.sampled_from(FORMATS))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    shape = (height, width) if channels == 1 else (height, width, 3)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, np.uint8)
    return image_file(pixels, format), (height, width), format


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(image_files(), st.sampled_from([1, 3, None]))
def test_every_real_file_decodes_to_the_asked_channels_and_its_own_size(case, channels):
    data, (height, width), format = case
    image = read_image(data, channels, default_max_pixels(28 * 28))
    assert image.dtype.is_floating_point is False and str(image.dtype) == "torch.uint8"
    assert tuple(image.shape[1:]) == (height, width)
    if channels is not None:
        assert image.shape[0] == channels
    else:
        assert image.shape[0] in (1, 2, 3, 4)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=2048), st.sampled_from([1, 3, None]))
def test_arbitrary_bytes_decode_or_raise_input_error(data, channels):
    try:
        image = read_image(data, channels, 10_000)
    except InputError as exc:
        assert str(exc).startswith("image: ") and exc.field == "image"
    else:
        assert image.ndim == 3 and image.shape[1] * image.shape[2] <= 10_000


@settings(max_examples=200, deadline=None, derandomize=True)
@given(image_files(), st.data())
def test_corrupted_real_files_decode_or_raise_input_error(case, data):
    """Flipped and truncated bytes of real files: the parsers' error paths, not just garbage at byte 0."""
    raw = bytearray(case[0])
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    try:
        read_image(bytes(raw[:cut]), 3, 10_000)
    except InputError:
        pass


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 60000), st.integers(1, 60000))
def test_declared_size_past_the_limit_is_refused_before_decoding(width, height):
    limit = 5000 * 5000
    data = gif_canvas_bomb(width, height)
    if width * height > limit:
        with pytest.raises(InputTooLarge, match=r"pixels is more than is decoded here \(25,000,000 pixels\)"):
            read_image(data, 3, limit)
    elif width * height <= 2000 * 2000:  # small enough to decode in a test
        assert tuple(read_image(data, 3, limit).shape) == (3, height, width)


def test_the_limit_is_checked_on_paths_too(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(6000, 6000))
    with pytest.raises(InputTooLarge, match=rf"{path}: 6000x6000 pixels is more than is decoded here .*; downscale"):
        read_image(path, 1, 1000 * 1000, where=str(path), field=None)
    assert read_image_size(path, 10 ** 9) == (6000, 6000)


@pytest.mark.parametrize("format", ["BMP", "TIFF", "ICO"])
def test_only_the_four_documented_formats_are_opened(format):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format=format)
    with pytest.raises(InputError, match=r"image: cannot be decoded as PNG, JPEG, GIF or WebP"):
        read_image(buffer.getvalue(), 3, 10_000)


def test_sixteen_bit_pixels_are_refused():
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(buffer, format="PNG")
    with pytest.raises(InputError, match=r"more than 8 bits per channel"):
        read_image(buffer.getvalue(), 1, 10_000)
