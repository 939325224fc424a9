"""The IDX format (MNIST/Fashion-MNIST): byte-exact headers, round trips, and corrupt files named in the error."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from modelworks.data.idx import read_idx, write_idx
from modelworks.errors import DataError


def sample_images(n: int = 5) -> np.ndarray:
    return (np.arange(n * 28 * 28) % 251).astype(np.uint8).reshape(n, 28, 28)


def deflate_start(gz: bytes) -> int:
    """Offset of the compressed stream in a gzip member (RFC 1952): fixed header, then an optional file name."""
    flags, offset = gz[3], 10
    if flags & 0x04:  # FEXTRA
        offset += 2 + int.from_bytes(gz[offset:offset + 2], "little")
    for bit in (0x08, 0x10):  # FNAME, FCOMMENT: zero-terminated
        if flags & bit:
            offset = gz.index(b"\0", offset) + 1
    return offset


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_round_trip_images(tmp_path, name):
    images = sample_images()
    write_idx(tmp_path / name, images)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.uint8 and back.shape == (5, 28, 28)
    np.testing.assert_array_equal(back, images)


def test_round_trip_labels_and_int8(tmp_path):
    labels = np.array([9, 0, 3, 3, 7], dtype=np.uint8)
    write_idx(tmp_path / "labels-idx1-ubyte.gz", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels-idx1-ubyte.gz"), labels)
    signed = np.array([[-128, 127], [0, -1]], dtype=np.int8)
    write_idx(tmp_path / "signed", signed)
    back = read_idx(tmp_path / "signed")
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, signed)


def test_written_header_is_the_real_format(tmp_path):
    """Magic 0x00000803 (uint8, 3 dims), then big-endian sizes, then raw row-major pixels: as LeCun's files."""
    images = sample_images(3)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    assert data[:4] == bytes([0, 0, 0x08, 3])
    assert data[4:16] == (3).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    assert data[16:] == images.tobytes()
    write_idx(tmp_path / "labels", np.array([1, 2], dtype=np.uint8))
    assert (tmp_path / "labels").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2])


def test_reads_a_hand_made_big_endian_int32_file(tmp_path):
    """Types other than uint8 exist in the format (0x0C: int32, big-endian); the reader decodes them."""
    values = np.array([1, -2, 70000], dtype=">i4")
    path = tmp_path / "ints"
    path.write_bytes(bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), [1, -2, 70000])


def test_truncated_plain_file_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, sample_images())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{path}: \d+ bytes but its header \(5, 28, 28\) needs 3936; the file is "
                                        r"truncated or corrupt"):
        read_idx(path)


def test_truncated_gzip_file_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, sample_images())
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match=rf"{path}: cannot be read .*corrupt or truncated"):
        read_idx(path)


def test_gzip_with_bad_checksum_names_the_file(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.arange(200, dtype=np.uint8))
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the CRC32 of the trailer
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{path}: cannot be read"):
        read_idx(path)


def test_gzip_with_corrupt_compressed_stream_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, sample_images())
    data = bytearray(path.read_bytes())
    data[deflate_start(bytes(data))] = 0xFF  # final block of reserved type 3: an invalid stream
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{path}"):
        read_idx(path)


def test_bad_magic_number_names_the_file(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(DataError, match=rf"{path}: not an IDX file \(bad magic number 504b0304\)"):
        read_idx(path)


def test_empty_file_is_not_idx(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{path}: not an IDX file"):
        read_idx(path)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent-idx1-ubyte.gz"
    with pytest.raises(DataError, match=rf"{path}: cannot be read"):
        read_idx(path)


def test_gzip_holding_garbage_is_not_idx(tmp_path):
    path = tmp_path / "garbage.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x01\x02\x03\x04hello")
    with pytest.raises(DataError, match=rf"{Path(path)}: not an IDX file"):
        read_idx(path)
