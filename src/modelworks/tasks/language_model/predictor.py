"""Text generation over the exported `prefill` and `decode` graphs, with a KV cache per sequence.

The predictor is driven step by step, so a scheduler can let sequences join and leave the running batch at every
step (continuous batching):

    sequence = predictor.start(item)                 # no graph call yet
    deltas = predictor.step(active_sequences, run)   # one token for each: new ones are prefilled (batched, left-
                                                     # padded), the others decoded (batched) in the same step
    predictor.respond(sequence)                      # the Response once `sequence.finished`

`predict(items, run)` is that loop for one fixed batch. Each sequence holds its own keys/values (numpy,
[L, 2, H, S, D]); a step pads the active caches on the left to one length and masks the padding, with each row's
own positions, so sequences of different lengths share a graph call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...data.text import tokenizer_from_json
from ...errors import InputError
from ..base import Predictor
from .sampling import SamplingOptions, choose_token

TOKENIZER_FILE = "tokenizer.json"


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="The text to continue.")
    max_tokens: int = Field(64, description="Most tokens to generate (>= 1).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_k: int = Field(0, ge=0, description="Sample among the k most probable tokens; 0: all.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set with this mass.")
    min_p: float = Field(0.0, ge=0, le=1, description="Drop tokens less probable than min_p x the top one.")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages tokens already in the text.")
    presence_penalty: float = Field(0.0, description="Subtracted from the logit of every token generated so far.")
    stop: str | list[str] | None = Field(None, description="Stop before this string, or any of these strings.")
    seed: int | None = Field(None, description="Seed of this request's sampling; equal seeds give equal text.")


class CompletionResponse(BaseModel):
    text: str
    finish_reason: str = Field(description="stop (a stop string or end of text) or length (max_tokens)")
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationItem:
    prompt_ids: list[int]
    max_tokens: int
    options: SamplingOptions
    stop: list[str]
    seed: int | None


@dataclass
class Delta:
    text: str  # new text since the last delta (held back while a stop string may be forming)
    token: int | None
    finished: bool
    finish_reason: str | None


@dataclass
class Sequence:
    item: GenerationItem
    rng: np.random.Generator
    tokens: list[int]  # prompt and generated
    window_start: int = 0  # index in `tokens` of the cache's first entry (moves when the context overflows)
    cache: np.ndarray | None = None  # [L, 2, H, S, D]; None: needs a prefill
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the generated text decoded so far
    pending: list[int] = field(default_factory=list)  # tokens not in `text` yet: a partial UTF-8 character (BPE)
    emitted: int = 0  # characters of `text` handed out in deltas
    finished: bool = False
    finish_reason: str | None = None


class TextGenerator(Predictor):
    Request = CompletionRequest
    Response = CompletionResponse

    def __init__(self, spec: dict, tokenizer=None, folder: Path | None = None):
        super().__init__(spec)
        if tokenizer is None:
            if folder is None:
                raise ValueError("TextGenerator: give the tokenizer or the package folder holding it")
            tokenizer = tokenizer_from_json((Path(folder) / spec["tokenizer_file"]).read_text())
        self.tokenizer = tokenizer
        self.context = int(spec["context"])
        self.max_tokens_limit = int(spec.get("max_tokens_limit", 4096))

    @staticmethod
    def build_spec(tokenizer, context: int, graphs: dict) -> dict:
        return {"tokenizer_file": TOKENIZER_FILE, "tokenizer_kind": tokenizer.kind,
                "vocab_size": tokenizer.vocab_size, "end_of_text": tokenizer.eot_id, "context": context,
                "graphs": graphs, "inputs": graphs["prefill"]["inputs"], "outputs": graphs["prefill"]["outputs"],
                "max_tokens_limit": 4096}

    def files(self) -> dict[str, bytes]:
        return {self.spec["tokenizer_file"]: self.tokenizer.to_json().encode()}

    # ------------------------------------------------------------------------------------------ requests

    def example_request(self):
        prompt = self.tokenizer.decode([0]) if self.tokenizer.kind == "char" else "The"
        return CompletionRequest(prompt=prompt, max_tokens=8, temperature=0.8, top_k=10, seed=0), None

    def parse(self, request: CompletionRequest, file: bytes | None = None) -> GenerationItem:
        if not request.prompt:
            raise InputError("prompt: empty; give at least one character of text to continue", "prompt")
        ids = self.tokenizer.encode(request.prompt, "prompt")
        if not ids:
            raise InputError("prompt: encodes to no tokens; give some text to continue", "prompt")
        if len(ids) > self.context:
            raise InputError(f"prompt: {len(ids)} tokens, longer than the model's context of {self.context}; "
                             "shorten it", "prompt")
        if not 1 <= request.max_tokens <= self.max_tokens_limit:
            raise InputError(f"max_tokens: must be between 1 and {self.max_tokens_limit} (got {request.max_tokens})",
                             "max_tokens")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if any(not s for s in stop):
            raise InputError("stop: an empty stop string would stop at once; remove it", "stop")
        options = SamplingOptions(request.temperature, request.top_k, request.top_p, request.min_p,
                                  request.repetition_penalty, request.presence_penalty)
        return GenerationItem(ids, request.max_tokens, options, stop, request.seed)

    # ------------------------------------------------------------------------------------------ the loop

    def start(self, item: GenerationItem) -> Sequence:
        return Sequence(item, np.random.default_rng(item.seed), list(item.prompt_ids))

    def step(self, sequences: list[Sequence], run) -> list[Delta]:
        """One new token for every unfinished sequence in `sequences` (in order): those without a cache are
        prefilled, the others decoded, each group in one batched graph call."""
        logits: dict[int, np.ndarray] = {}
        fresh = [i for i, s in enumerate(sequences) if s.cache is None and not s.finished]
        running = [i for i, s in enumerate(sequences) if s.cache is not None and not s.finished]
        if fresh:
            logits.update(zip(fresh, self.prefill([sequences[i] for i in fresh], run)))
        if running:
            logits.update(zip(running, self.decode([sequences[i] for i in running], run)))
        deltas = []
        for i, sequence in enumerate(sequences):
            if i not in logits:
                deltas.append(Delta("", None, sequence.finished, sequence.finish_reason))
                continue
            deltas.append(self.advance(sequence, logits[i]))
        return deltas

    def prefill(self, sequences: list[Sequence], run) -> list[np.ndarray]:
        windows = [s.tokens[s.window_start:] for s in sequences]
        T = max(len(w) for w in windows)
        tokens = np.zeros((len(windows), T), np.int64)
        positions = np.zeros((len(windows), T), np.int64)
        mask = np.zeros((len(windows), T), bool)
        for b, window in enumerate(windows):
            n = len(window)
            tokens[b, T - n:] = window
            positions[b, T - n:] = np.arange(n)
            mask[b, T - n:] = True
        logits, kv = run({"tokens": tokens, "positions": positions, "mask": mask}, graph="prefill")
        for b, (sequence, window) in enumerate(zip(sequences, windows)):
            sequence.cache = np.ascontiguousarray(kv[:, :, b, :, T - len(window):])
        return list(logits)

    def decode(self, sequences: list[Sequence], run) -> list[np.ndarray]:
        S = max(s.cache.shape[3] for s in sequences)
        L, two, H, _, D = sequences[0].cache.shape
        B = len(sequences)
        past = np.zeros((L, two, B, H, S, D), sequences[0].cache.dtype)
        mask = np.zeros((B, S + 1), bool)
        tokens = np.zeros((B, 1), np.int64)
        positions = np.zeros((B, 1), np.int64)
        for b, sequence in enumerate(sequences):
            n = sequence.cache.shape[3]
            past[:, :, b, :, S - n:] = sequence.cache
            mask[b, S - n:] = True
            tokens[b, 0] = sequence.tokens[-1]
            positions[b, 0] = n
        logits, kv = run({"tokens": tokens, "positions": positions, "mask": mask, "past": past}, graph="decode")
        for b, sequence in enumerate(sequences):
            sequence.cache = np.concatenate([sequence.cache, kv[:, :, b]], axis=3)
        return list(logits)

    def advance(self, sequence: Sequence, logits: np.ndarray) -> Delta:
        """Choose the next token, extend the text, check the stop conditions; the text delta to hand out."""
        item = sequence.item
        token = choose_token(np.asarray(logits, np.float32), sequence.tokens, sequence.generated, item.options,
                             sequence.rng)
        if token == self.tokenizer.eot_id:
            return self.finish(sequence, "stop", None)
        sequence.tokens.append(token)
        sequence.generated.append(token)
        # Decoded incrementally (the whole text again at every token would cost O(n) per step); byte-level
        # tokens that end inside a UTF-8 character wait in `pending` for the rest of it.
        sequence.pending.append(token)
        piece = self.tokenizer.decode(sequence.pending)
        if not piece.endswith("\ufffd"):
            sequence.text += piece
            sequence.pending.clear()
        for stop in item.stop:
            at = sequence.text.find(stop, max(sequence.emitted - len(stop), 0))
            if at >= 0:
                sequence.text = sequence.text[:at]
                return self.finish(sequence, "stop", token)
        if len(sequence.generated) >= item.max_tokens:
            return self.finish(sequence, "length", token)
        if sequence.cache is not None and sequence.cache.shape[3] + 1 > self.context:
            # The cache is full: keep the last half of the context and prefill it again at the next step (positions
            # restart at 0, as the model saw them in training).
            sequence.window_start = len(sequence.tokens) - self.context // 2
            sequence.cache = None
        # Hold back text that could still become a stop string.
        safe = len(sequence.text)
        for stop in item.stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if sequence.text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        safe = max(safe, sequence.emitted)
        delta, sequence.emitted = sequence.text[sequence.emitted:safe], safe
        return Delta(delta, token, False, None)

    def finish(self, sequence: Sequence, reason: str, token: int | None) -> Delta:
        sequence.finished, sequence.finish_reason, sequence.cache = True, reason, None
        if sequence.pending:  # the end came inside a character: show what there is (U+FFFD for the rest)
            sequence.text += self.tokenizer.decode(sequence.pending)
            sequence.pending.clear()
        delta, sequence.emitted = sequence.text[sequence.emitted:], len(sequence.text)
        return Delta(delta, token, True, reason)

    def respond(self, sequence: Sequence) -> CompletionResponse:
        return CompletionResponse(text=sequence.text, finish_reason=sequence.finish_reason or "length",
                                  prompt_tokens=len(sequence.item.prompt_ids),
                                  completion_tokens=len(sequence.generated))

    def predict(self, items: list, run) -> list[CompletionResponse]:
        sequences = [self.start(item) for item in items]
        while not all(s.finished for s in sequences):
            self.step(sequences, run)
        return [self.respond(s) for s in sequences]
