"""Serving-side captioning over the exported `encode` and `decode` graphs.

An image is decoded by the shared image decoding (tasks/image_requests.py) and resized to the model's square
input as evaluation resizes it (data/captioning/formats.resize_square). The encoder runs once per image and
returns every block's cross-attention keys/values; the decoder then runs one token per call with its own
self-attention cache, for:

- beam search with a length penalty (models/decoding.py), `n` best captions (temperature 0, the default);
- sampling (temperature > 0; top-k, top-p): `n` captions drawn with the request's seed;
- streaming, greedy or sampled, token by token through the same step-wise API as the language model
  (`start` / `step` / `respond`, serve/streaming.py): POST /v1/completions with the image in `image`.

Each hypothesis holds its own cache (numpy, [L, 2, H, S, D], its first entry a masked placeholder so that the first
step needs no empty tensor); a call pads the rows' caches on the left to one length and masks the padding, so rows
of different lengths (sequences that joined the batch at different steps) share a graph call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ...data.captioning.formats import resize_square
from ...data.captioning.words import caption_tokenizer_from_json, normalise
from ...errors import InputError, InputTooLarge
from ...models.decoding import beam_search
from ..base import Predictor
from ..image_requests import (FORMATS, IMAGE_SUFFIXES, INLINE_PIXELS, ScreensImageHeaders, decode_base64,
                              decode_image_file, default_max_pixels, small_file)
from ...models.sampling import SamplingOptions, choose_token

TOKENIZER_FILE = "tokenizer.json"
MAX_BEAM = 8  # wider beams cost linearly and, on captioning, score no better (Vinyals et al. 2016 use 3)
MAX_SAMPLES = 8


class CaptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str | None = Field(
        None, description=f"The image file ({FORMATS}), base64-encoded; a `data:` URL prefix is accepted. "
                          "Alternatively upload it as the multipart form field `image`. Resized to the model's input.")
    beam: int | None = Field(None, description=f"Beam width, 1 (greedy) to {MAX_BEAM}. Default: the model's.")
    n: int = Field(1, description="Captions to return: the n best of the beam (n <= beam), or n samples.")
    max_length: int | None = Field(None, description="Most tokens per caption. Default and upper bound: the "
                                                     "model's (`limits` in GET /v1/models/{name}).")
    length_penalty: float | None = Field(None, description="GNMT's alpha, 0 to 5: higher favours longer captions "
                                                           "in the beam. Default: the model's.")
    temperature: float = Field(0.0, ge=0, description="0: beam search (deterministic); > 0: sample n captions.")
    top_k: int = Field(0, ge=0, description="Sampling among the k most probable tokens; 0: all.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set with this mass.")
    seed: int | None = Field(None, description="Seed of the sampling; equal seeds give equal captions.")
    prompt: str = Field("", description="The caption's beginning, to be continued (streamed completions send it).")


class Caption(BaseModel):
    text: str = Field(description="The caption (the prompt included).")
    log_prob: float = Field(description="Sum of the generated tokens' natural-log probabilities (end included).")
    score: float = Field(description="What the beam ranks by: log_prob / ((5 + length) / 6) ^ length_penalty.")
    finish_reason: str = Field(description="stop (the model ended it) or length (max_length)")


class CaptionResponse(BaseModel):
    captions: list[Caption] = Field(description="Best first.")
    width: int = Field(description="The image's width in pixels, as decoded.")
    height: int = Field(description="The image's height in pixels.")


@dataclass
class CaptionItem:
    image: np.ndarray  # float32 [3, S, S] in [0, 1]
    prompt_ids: list[int]
    beam: int
    n: int
    max_length: int
    alpha: float
    options: SamplingOptions
    seed: int | None
    width: int = 0
    height: int = 0


@dataclass
class Row:
    """One hypothesis' decoder state: its self-attention cache [L, 2, H, S, D] with `mask` [S] marking the real
    entries, and the image's cross-attention keys/values [L, 2, H, M, D]."""

    cache: np.ndarray
    mask: np.ndarray
    memory: np.ndarray
    length: int = 0  # tokens in the cache (its position count)

    @classmethod
    def start(cls, memory: np.ndarray, head_dim: int) -> Row:
        L, two, H = memory.shape[:3]
        return cls(np.zeros((L, two, H, 1, head_dim), memory.dtype), np.zeros(1, bool), memory)


def decode_rows(rows: list[Row], tokens: Sequence[int], run) -> tuple[np.ndarray, list[Row]]:
    """One decoder call for every row: log-probabilities [k, V] and the rows with the token appended (new objects:
    rows may be shared by several beam hypotheses)."""
    S = max(r.cache.shape[3] for r in rows)
    L, two, H, _, D = rows[0].cache.shape
    k = len(rows)
    past = np.zeros((L, two, k, H, S, D), rows[0].cache.dtype)
    mask = np.zeros((k, S + 1), bool)
    for b, row in enumerate(rows):
        n = row.cache.shape[3]
        past[:, :, b, :, S - n:] = row.cache
        mask[b, S - n:S] = row.mask
    mask[:, S] = True
    memory = np.stack([r.memory for r in rows], axis=2)
    positions = np.array([[r.length] for r in rows], np.int64)
    log_probs, kv = run({"tokens": np.asarray(tokens, np.int64).reshape(k, 1), "positions": positions, "mask": mask,
                         "past": past, "memory_kv": memory}, graph="decode")
    new_rows = [Row(np.concatenate([r.cache, kv[:, :, b]], axis=3), np.append(r.mask, True), r.memory, r.length + 1)
                for b, r in enumerate(rows)]
    return np.asarray(log_probs), new_rows


@dataclass
class Delta:
    text: str
    token: int | None
    finished: bool
    finish_reason: str | None


@dataclass
class CaptionSequence:
    """A streamed caption (greedy or sampled)."""

    item: CaptionItem
    rng: np.random.Generator
    forced: list[int]  # prompt tokens still to feed
    memory: np.ndarray | None = None  # the image's cross-attention keys/values, once encoded
    row: Row | None = None
    next_input: int = 0
    generated: list[int] = field(default_factory=list)
    log_prob: float = 0.0
    shown: str = ""  # the whole caption decoded so far (prompt included)
    text: str = ""  # the generated part of it, as streamed
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class Completion:
    """What a streamed sequence answers (serve/completions.py reads these fields)."""

    text: str
    finish_reason: str
    completion_tokens: int


class CaptionPredictor(ScreensImageHeaders, Predictor):
    Request = CaptionRequest
    Response = CaptionResponse
    file_field = "image"
    file_suffixes = IMAGE_SUFFIXES

    def __init__(self, spec: dict, tokenizer=None, folder: Path | None = None):
        super().__init__(spec)
        if tokenizer is None:
            if folder is None:
                raise ValueError("CaptionPredictor: give the tokenizer or the package folder holding it")
            tokenizer = caption_tokenizer_from_json((Path(folder) / spec["tokenizer_file"]).read_text())
        self.tokenizer = tokenizer
        self.eot = int(spec["end_of_text"])
        self.image_size = int(spec["image_size"])
        self.head_dim = int(spec["head_dim"])
        self.max_length = int(spec["max_length"])
        self.defaults = spec["defaults"]
        self.max_image_pixels = default_max_pixels(self.image_size ** 2)

    @staticmethod
    def build_spec(tokenizer, image_size: int, head_dim: int, max_length: int, beam: int, length_penalty: float,
                   graphs: dict) -> dict:
        return {"tokenizer_file": TOKENIZER_FILE, "tokenizer_kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                "end_of_text": tokenizer.eot_id, "image_size": image_size, "head_dim": head_dim,
                "max_length": max_length, "graphs": graphs, "inputs": graphs["encode"]["inputs"],
                "outputs": graphs["encode"]["outputs"],
                "defaults": {"beam": beam, "length_penalty": length_penalty, "max_length": max_length},
                "preprocessing": {"decoder": "Pillow (modelworks.data.image_files)", "color": "RGB",
                                  "resize": f"{image_size}x{image_size}, bilinear, antialiased", "scale": "1/255"}}

    def files(self) -> dict[str, bytes]:
        return {self.spec["tokenizer_file"]: self.tokenizer.to_json().encode()}

    @property
    def limits(self) -> dict:
        return {**super().limits, "beam": MAX_BEAM, "n": MAX_SAMPLES, "max_length": self.max_length}

    # ------------------------------------------------------------------------------------------ requests

    def example_request(self) -> tuple[CaptionRequest, bytes]:
        import io

        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (self.image_size, self.image_size, 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return CaptionRequest(beam=2, max_length=min(5, self.max_length)), buffer.getvalue()

    def parse(self, request: CaptionRequest, file: bytes | None = None) -> CaptionItem:
        data = file if file is not None else decode_base64(request.image)
        return self._item(request, data, self.max_image_pixels)

    def parse_inline(self, request: CaptionRequest, file: bytes | None = None) -> CaptionItem | None:
        data = small_file(request.image, file)
        if data is None:
            return None
        try:
            return self._item(request, data, min(INLINE_PIXELS, self.max_image_pixels))
        except InputTooLarge:  # a small file declaring many pixels: the pool decodes it, against the real limit
            return None

    def _item(self, request: CaptionRequest, data: bytes, max_pixels: int) -> CaptionItem:
        beam = self.defaults["beam"] if request.beam is None else request.beam
        if not 1 <= beam <= MAX_BEAM:
            raise InputError(f"beam: must be between 1 and {MAX_BEAM} (got {beam})", "beam")
        max_length = self.max_length if request.max_length is None else request.max_length
        if not 1 <= max_length <= self.max_length:
            raise InputError(f"max_length: must be between 1 and the model's {self.max_length} (got {max_length})",
                             "max_length")
        limit = beam if request.temperature == 0 else MAX_SAMPLES
        if not 1 <= request.n <= limit:
            what = f"the beam width {beam}" if request.temperature == 0 else f"{MAX_SAMPLES} samples"
            raise InputError(f"n: must be between 1 and {what} (got {request.n}); widen the beam or sample "
                             "(temperature > 0)", "n")
        alpha = self.defaults["length_penalty"] if request.length_penalty is None else request.length_penalty
        if not 0 <= alpha <= 5:
            raise InputError(f"length_penalty: must be between 0 and 5 (got {alpha})", "length_penalty")
        prompt_ids = self.tokenizer.encode(normalise(request.prompt), "prompt") if request.prompt else []
        if len(prompt_ids) >= max_length:
            raise InputError(f"prompt: {len(prompt_ids)} tokens, not shorter than max_length={max_length}; shorten "
                             "it", "prompt")
        image = decode_image_file(data, 3, f"send a {FORMATS} image", max_pixels)
        _, height, width = image.shape
        pixels = resize_square(image, self.image_size).numpy().astype(np.float32) / np.float32(255)
        options = SamplingOptions(request.temperature, request.top_k, request.top_p)
        return CaptionItem(pixels, prompt_ids, beam, request.n, max_length, alpha, options, request.seed, width, height)

    def item_for(self, image: np.ndarray, beam: int | None = None, max_length: int | None = None) -> CaptionItem:
        """An item for an image already at the model's input (float32 [3, S, S] in [0, 1]): evaluation's path."""
        return CaptionItem(image, [], beam or self.defaults["beam"], 1, max_length or self.max_length,
                           self.defaults["length_penalty"], SamplingOptions(0.0), None, image.shape[2],
                           image.shape[1])

    # ------------------------------------------------------------------------------------------ one batch

    def encode(self, items: list[CaptionItem], run) -> list[np.ndarray]:
        """Each image's cross-attention keys/values [L, 2, H, M, D], one encoder call for the batch."""
        (memory,) = run({"images": np.stack([item.image for item in items])}, graph="encode")[:1]
        memory = np.asarray(memory)
        return [np.ascontiguousarray(memory[:, :, b]) for b in range(len(items))]

    def predict(self, items: list[CaptionItem], run) -> list[CaptionResponse]:
        responses = []
        for item, memory in zip(items, self.encode(items, run)):
            if item.options.temperature == 0:
                captions = self.beam_captions(item, memory, run)
            else:
                captions = self.sampled_captions(item, memory, run)
            responses.append(CaptionResponse(captions=captions, width=item.width, height=item.height))
        return responses

    def prefix_row(self, item: CaptionItem, memory: np.ndarray, run) -> tuple[Row, int]:
        """The row after the start token and all but the last prompt token, and the next input token."""
        row = Row.start(memory, self.head_dim)
        inputs = [self.eot] + item.prompt_ids
        for token in inputs[:-1]:
            _, (row,) = decode_rows([row], [token], run)
        return row, inputs[-1]

    def beam_captions(self, item: CaptionItem, memory: np.ndarray, run) -> list[Caption]:
        row, first = self.prefix_row(item, memory, run)
        rows = [row]

        def step(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
            nonlocal rows
            if parents is not None:
                rows = [rows[p] for p in parents]
            log_probs, rows = decode_rows(rows, tokens, run)
            return log_probs

        budget = item.max_length - len(item.prompt_ids)
        hypotheses = beam_search(step, self.eot, item.beam, budget, item.alpha, item.n, np.array([first]))
        return [Caption(text=self.tokenizer.decode(item.prompt_ids + h.tokens), log_prob=h.log_prob, score=h.score,
                        finish_reason="stop" if h.finished else "length") for h in hypotheses]

    def sampled_captions(self, item: CaptionItem, memory: np.ndarray, run) -> list[Caption]:
        sequences = [self.start(item, seed_offset=j) for j in range(item.n)]
        for sequence in sequences:
            sequence.memory = memory  # encoded once for the n samples
        while not all(s.finished for s in sequences):
            self.step(sequences, run)
        captions = [Caption(text=self.tokenizer.decode(item.prompt_ids + s.generated), log_prob=s.log_prob,
                            score=s.log_prob, finish_reason=s.finish_reason or "length") for s in sequences]
        return sorted(captions, key=lambda c: -c.score)

    # ------------------------------------------------------------------------------------------ step by step

    def start(self, item: CaptionItem, seed_offset: int = 0) -> CaptionSequence:
        seed = None if item.seed is None else item.seed + seed_offset
        return CaptionSequence(item, np.random.default_rng(seed), list(item.prompt_ids),
                               shown=self.tokenizer.decode(item.prompt_ids))

    def step(self, sequences: list[CaptionSequence], run) -> list[Delta]:
        """One token for every unfinished sequence: new ones are encoded (one batched call) and all are decoded
        in one batched call."""
        fresh = [s for s in sequences if s.row is None and not s.finished]
        unencoded = [s for s in fresh if s.memory is None]
        if unencoded:
            for s, memory in zip(unencoded, self.encode([s.item for s in unencoded], run)):
                s.memory = memory
        for s in fresh:
            s.row, s.next_input = Row.start(s.memory, self.head_dim), self.eot
        active = [s for s in sequences if not s.finished]
        deltas: dict[int, Delta] = {}
        if active:
            log_probs, rows = decode_rows([s.row for s in active], [s.next_input for s in active], run)
            for s, row, lp in zip(active, rows, log_probs):
                s.row = row
                deltas[id(s)] = self.advance(s, lp)
        return [deltas.get(id(s), Delta("", None, s.finished, s.finish_reason)) for s in sequences]

    def advance(self, sequence: CaptionSequence, log_probs: np.ndarray) -> Delta:
        if sequence.forced:  # the prompt is fed, not chosen
            sequence.next_input = sequence.forced.pop(0)
            return Delta("", None, False, None)
        item = sequence.item
        token = choose_token(np.asarray(log_probs, np.float32), [], sequence.generated, item.options, sequence.rng)
        sequence.log_prob += float(log_probs[token])
        if token == self.eot:
            return self.finish(sequence, "stop", None)
        sequence.generated.append(token)
        sequence.next_input = token
        # The whole caption decoded again (a few words): a word tokenizer's spaces and BPE's merged pieces come
        # out as the finished caption shows them.
        shown = self.tokenizer.decode(item.prompt_ids + sequence.generated)
        delta = shown[len(sequence.shown):] if shown.startswith(sequence.shown) else shown
        sequence.shown = shown
        sequence.text += delta
        if len(item.prompt_ids) + len(sequence.generated) >= item.max_length:
            sequence.finished, sequence.finish_reason, sequence.row = True, "length", None
            return Delta(delta, token, True, "length")
        return Delta(delta, token, False, None)

    def finish(self, sequence: CaptionSequence, reason: str, token: int | None) -> Delta:
        sequence.finished, sequence.finish_reason, sequence.row = True, reason, None
        return Delta("", token, True, reason)

    def respond(self, sequence: CaptionSequence) -> Completion:
        return Completion(sequence.text, sequence.finish_reason or "length", len(sequence.generated))

    def confidence(self, response: CaptionResponse) -> float | None:
        """The best caption's geometric-mean token probability."""
        if not response.captions:
            return None
        best = response.captions[0]
        tokens = max(1, len(self.tokenizer.encode(best.text)) + (best.finish_reason == "stop"))
        return math.exp(best.log_prob / tokens)

    def postprocess(self, outputs, items):  # predict() overrides the one-call path
        raise NotImplementedError


def eager_runner(model: torch.nn.Module):
    """The encode and decode graphs of `model` in eager PyTorch, called as a predictor calls a package's graphs."""
    from ...export.runtime import GraphSet, TorchRunner
    from .model import DecodeGraph, EncodeGraph

    return GraphSet({"encode": TorchRunner(EncodeGraph(model), ["images"]),
                     "decode": TorchRunner(DecodeGraph(model), ["tokens", "positions", "mask", "past", "memory_kv"])})
