"""Caption tokenizers: word-level with a minimum count (the classic captioning vocabulary: Karpathy's neuraltalk
keeps words seen at least 5 times), or the language model's byte-level BPE (data/text.py). Both offer the same
small interface (encode, decode, eot_id, vocab_size, to_json), and both are plain JSON in a package.

A caption is normalised the same way for training, metrics and serving: lower case, words and punctuation apart.
Token `eot_id` both starts a caption (the decoder's first input) and ends it, as GPT's end-of-text does.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from ..text import tokenizer_from_json, train_tokenizer

WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]")
END, UNKNOWN = "<end>", "<unk>"


def normalise(caption: str) -> str:
    return " ".join(WORD.findall(caption.lower()))


class WordTokenizer:
    kind = "word"

    def __init__(self, words: list[str]):
        self.words = [END, UNKNOWN] + list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.eot_id, self.unknown_id = 0, 1

    @classmethod
    def train(cls, captions: list[str], min_count: int) -> WordTokenizer:
        counts = Counter(w for c in captions for w in WORD.findall(c.lower()))
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str, field: str | None = None) -> list[int]:
        return [self.index.get(w, self.unknown_id) for w in WORD.findall(text.lower())]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids if i != self.eot_id)

    def to_json(self) -> str:
        return json.dumps({"kind": "word", "words": self.words[2:]})


def train_caption_tokenizer(kind: str, captions: list[str], min_count: int, vocab_size: int):
    if kind == "word":
        return WordTokenizer.train(captions, min_count)
    return train_tokenizer("bpe", [normalise(c) for c in captions], vocab_size)


def caption_tokenizer_from_json(text: str):
    data = json.loads(text)
    if data.get("kind") == "word":
        return WordTokenizer(list(data["words"]))
    return tokenizer_from_json(text)
