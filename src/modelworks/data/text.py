"""Text corpora for language modelling: reading `text:PATH` sources, tokenizers, cached token arrays, windows.

A source is a .txt file, a folder of .txt files (each one document, in name order) or a .jsonl file with a
"text" field per line. Documents are joined with an end-of-text token. The split is deterministic: the last
`val_fraction` of the characters is validation, as nanoGPT's prepare scripts do for tiny-shakespeare, so its
published losses compare with ours.

Tokenizers: a character vocabulary read from the training text, or byte-level BPE trained locally with Hugging
Face `tokenizers`. Both are plain JSON (no pickle) so they travel in the run directory and the model package.
Encoded splits are cached as uint16/uint32 .npy arrays keyed by a hash of the text and the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, InputError
from ..files import write_atomic

END_OF_TEXT = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------- reading


def read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte offset {exc.start}); convert the file "
                        "to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def read_documents(path: Path) -> list[str]:
    """The documents of a text source, in a fixed order."""
    if not path.exists():
        raise DataError(f"data.source: {path} does not exist; give a .txt file, a folder of .txt files or a "
                        ".jsonl file with a \"text\" field")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data.source: {path} holds no .txt files")
        documents = [read_utf8(p) for p in files]
    elif path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{number}: expected an object with a string \"text\" field")
            documents.append(record["text"])
    else:
        documents = [read_utf8(path)]
    documents = [d for d in documents if d]
    if not documents:
        raise DataError(f"data.source: {path} holds no text")
    return documents


def split_documents(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Cut the concatenated documents at the character where the last `val_fraction` begins (a document may be
    cut in two): nanoGPT's `data[:int(n * 0.9)]`."""
    total = sum(len(d) for d in documents)
    cut = int(total * (1 - val_fraction))
    train, val, seen = [], [], 0
    for doc in documents:
        if seen + len(doc) <= cut:
            train.append(doc)
        elif seen >= cut:
            val.append(doc)
        else:
            train.append(doc[:cut - seen])
            val.append(doc[cut - seen:])
        seen += len(doc)
    return train, val


# ---------------------------------------------------------------------------------------------- tokenizers


class CharTokenizer:
    """One token per character of the training text, plus end-of-text when there are several documents."""

    kind = "char"

    def __init__(self, chars: list[str], end_of_text: bool):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.eot_id = len(chars) if end_of_text else None

    @classmethod
    def train(cls, documents: list[str]) -> CharTokenizer:
        return cls(sorted(set("".join(documents))), end_of_text=len(documents) > 1)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + (self.eot_id is not None)

    def encode(self, text: str, field: str | None = None) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.index})
            raise InputError(f"{field or 'text'}: characters {''.join(unknown)!r} are not in this character "
                             f"model's vocabulary of {len(self.chars)}; use only characters seen in training",
                             field) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else END_OF_TEXT for i in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": self.chars, "end_of_text": self.eot_id is not None})


class BPETokenizer:
    """Byte-level BPE (GPT-2's scheme) trained with Hugging Face `tokenizers`: any text encodes, no unknowns."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.token_to_id(END_OF_TEXT)

    @classmethod
    def train(cls, documents: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(documents, trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, field: str | None = None) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tokenizer.to_str()


def tokenizer_from_json(text: str):
    data = json.loads(text)
    if data.get("kind") == "char":
        return CharTokenizer(list(data["chars"]), bool(data["end_of_text"]))
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_str(text))


def train_tokenizer(kind: str, documents: list[str], vocab_size: int):
    if kind == "char":
        return CharTokenizer.train(documents)
    return BPETokenizer.train(documents, vocab_size)


# ---------------------------------------------------------------------------------------------- token arrays


def encode_documents(tokenizer, documents: list[str]) -> np.ndarray:
    """Token ids of the documents, joined with end-of-text, as uint16 when the vocabulary fits (half the memory)."""
    ids: list[int] = []
    for i, doc in enumerate(documents):
        if i and tokenizer.eot_id is not None:
            ids.append(tokenizer.eot_id)
        ids.extend(tokenizer.encode(doc))
    return np.asarray(ids, dtype=np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)


def cached_encoding(cache_dir: Path | None, tokenizer, documents: list[str]) -> np.ndarray:
    """encode_documents, cached in `cache_dir` under a hash of the text and the tokenizer."""
    if cache_dir is None:
        return encode_documents(tokenizer, documents)
    digest = hashlib.sha256(tokenizer.to_json().encode())
    for doc in documents:
        digest.update(hashlib.sha256(doc.encode()).digest())
    path = cache_dir / f"tokens-{digest.hexdigest()[:20]}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    tokens = encode_documents(tokenizer, documents)
    # Atomic: the ranks of one run may all miss the cache and write it at once, while another already reads it.
    write_atomic(path, lambda f: np.save(f, tokens, allow_pickle=False))
    return tokens


class RandomWindows:
    """Training windows: sample i is tokens[i : i + context + 1] (inputs and their next-token targets). The
    engine's seeded permutation picks the starts, so windows derive from (seed, step) and resume exactly."""

    def __init__(self, tokens: np.ndarray, context: int, device: torch.device):
        if len(tokens) <= context + 1:
            raise DataError(f"data: the training split has {len(tokens)} tokens, fewer than a window of "
                            f"model.context + 1 = {context + 1}; use more text or a shorter context")
        self.tokens = torch.from_numpy(tokens.astype(np.int32)).to(device)
        self.context = context
        self.offsets = torch.arange(context + 1, device=device)

    def __len__(self) -> int:
        return len(self.tokens) - self.context

    def get_batch(self, indices: torch.Tensor):
        windows = self.tokens[indices.to(self.tokens.device).unsqueeze(1) + self.offsets].long()  # [B, T + 1]
        return windows[:, :-1], windows[:, 1:]


class StridedWindows(RandomWindows):
    """Evaluation windows that tile the split: window i starts at i * context, so every token after the first is
    a target exactly once and the summed loss is the split's total."""

    def __init__(self, tokens: np.ndarray, context: int, device: torch.device):
        if len(tokens) < 2:
            raise DataError(f"data: the validation split has {len(tokens)} tokens; it needs at least 2")
        context = min(context, len(tokens) - 1)
        super().__init__(np.concatenate([tokens, tokens[:1]]), context, device)  # a non-empty slice below
        self.n_tokens = len(tokens)

    def __len__(self) -> int:
        return max((self.n_tokens - 1) // self.context, 1)

    def get_batch(self, indices: torch.Tensor):
        return super().get_batch(indices.to(self.tokens.device) * self.context)


@dataclass
class TextCorpus:
    tokenizer: object
    train: np.ndarray
    val: np.ndarray
    val_chars: int  # characters of the validation text: bits per character = nats / chars / ln 2
    notes: list[str]
