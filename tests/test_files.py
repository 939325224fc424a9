"""write_atomic: a reader sees the old file or the whole new one; a failed write leaves the old file and no litter."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from modelworks.files import write_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "cache" / "tokens.json"
    write_text_atomic(path, "old")

    def half_then_crash(f):
        f.write(b"new, but only ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_crash)
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["tokens.json"]


def test_concurrent_writers_and_a_reader_never_meet_a_partial_file(tmp_path):
    """As the ranks of one run do when they all miss a cache at once (each writes, the others read)."""
    path = tmp_path / "tokens.bin"
    whole = [bytes([k]) * 200_000 for k in range(1, 5)]
    seen: list[bytes] = []

    def writer(data: bytes):
        for _ in range(20):
            write_atomic(path, lambda f: [f.write(data[i:i + 4096]) for i in range(0, len(data), 4096)])

    def reader():
        while any(t.is_alive() for t in writers):
            if path.is_file():
                seen.append(Path(path).read_bytes())

    writers = [threading.Thread(target=writer, args=(data,)) for data in whole]
    for t in writers:
        t.start()
    reading = threading.Thread(target=reader)
    reading.start()
    for t in [*writers, reading]:
        t.join()
    assert seen and all(content in whole for content in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.bin"]
