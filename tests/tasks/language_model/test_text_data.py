"""Text sources, the split, tokenizers and cached token arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modelworks.data import text as text_data
from modelworks.errors import DataError, InputError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


def test_char_tokenizer_round_trips_through_json():
    tokenizer = text_data.CharTokenizer.train([TEXT])
    again = text_data.tokenizer_from_json(tokenizer.to_json())
    ids = again.encode(TEXT)
    assert again.decode(ids) == TEXT and ids == tokenizer.encode(TEXT)
    assert again.vocab_size == len(set(TEXT)) and again.eot_id is None


def test_bpe_tokenizer_round_trips_any_text_through_json():
    tokenizer = text_data.BPETokenizer.train([TEXT], vocab_size=300)
    again = text_data.tokenizer_from_json(tokenizer.to_json())
    unseen = "Ünïcödé ✓ and words never seen: zebra 42\n"
    for text in (TEXT, unseen):
        ids = again.encode(text)
        assert again.decode(ids) == text and ids == tokenizer.encode(text)
    assert len(tokenizer.encode(TEXT)) < len(TEXT) / 2  # merges were learned
    assert again.decode([again.eot_id]) == text_data.END_OF_TEXT


def test_unknown_characters_for_a_char_model_are_named():
    tokenizer = text_data.CharTokenizer.train(["abc"])
    with pytest.raises(InputError, match=r"prompt: characters 'xz' are not in this character model's vocabulary"):
        tokenizer.encode("axbz", "prompt")


def test_a_non_utf8_file_names_the_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf".encode() + "é".encode("latin1") + b" au lait")
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text \(invalid continuation byte at byte offset 3\)"):
        text_data.read_documents(path)


def test_folders_and_jsonl_give_documents_joined_with_end_of_text(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second")
    (tmp_path / "docs" / "a.txt").write_text("first")
    assert text_data.read_documents(tmp_path / "docs") == ["first", "second"]
    lines = tmp_path / "d.jsonl"
    lines.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    documents = text_data.read_documents(lines)
    tokenizer = text_data.CharTokenizer.train(documents)
    ids = text_data.encode_documents(tokenizer, documents)
    assert tokenizer.decode(ids.tolist()) == "one" + text_data.END_OF_TEXT + "two" and ids.dtype == np.uint16
    lines.write_text('{"txt": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected an object with a string \"text\" field"):
        text_data.read_documents(lines)


def test_the_split_is_the_last_fraction_of_the_characters():
    train, val = text_data.split_documents(["abcdef", "ghij"], 0.3)
    assert "".join(train) == "abcdefg" and "".join(val) == "hij"
    train, val = text_data.split_documents(["x" * 100], 0.1)  # nanoGPT: data[:int(n * 0.9)]
    assert len(train[0]) == 90 and len(val[0]) == 10


def test_encoding_is_cached_by_content(tmp_path):
    tokenizer = text_data.CharTokenizer.train([TEXT])
    first = text_data.cached_encoding(tmp_path, tokenizer, [TEXT])
    (cached,) = tmp_path.glob("tokens-*.npy")
    assert np.array_equal(np.load(cached), first)
    text_data.cached_encoding(tmp_path, tokenizer, [TEXT[:-1]])
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2  # other text, another key


def test_windows_are_inputs_and_next_token_targets():
    tokens = np.arange(20, dtype=np.uint16)
    windows = text_data.RandomWindows(tokens, 4, torch.device("cpu"))
    x, y = windows.get_batch(torch.tensor([0, 15]))
    assert x.tolist() == [[0, 1, 2, 3], [15, 16, 17, 18]] and y.tolist() == [[1, 2, 3, 4], [16, 17, 18, 19]]
    assert len(windows) == 16
    strided = text_data.StridedWindows(tokens, 4, torch.device("cpu"))
    x, y = strided.get_batch(torch.arange(len(strided)))
    assert len(strided) == 4 and y.flatten().tolist() == list(range(1, 17))  # every target once
