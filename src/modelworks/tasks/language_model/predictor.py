"""Text generation over the exported `prefill` and `decode` graphs, with a preallocated KV cache.

The predictor is driven step by step, so a scheduler can let sequences join and leave the running batch at every
step (continuous batching):

    sequence = predictor.start(item)                 # no graph call yet
    deltas = predictor.step(active_sequences, run)   # one token for each: new ones are prefilled (batched, left-
                                                     # padded), the others decoded (batched) in the same step
    predictor.respond(sequence)                      # the Response once `sequence.finished`

`predict(items, run)` is that loop for one fixed batch. Keys and values live in one preallocated array per
stepping thread (`KVSlots`, [L, 2, slots, H, context, D]): a sequence owns a slot from its prefill to its end, the
prefill writes the slot, and a decode step hands the decode graph each layer's slots 0..n-1 by address; its
attention (ONNX Runtime's GroupQueryAttention) reads each row up to its own length and writes the new key/value
into the slot in place, so no step copies the cache. Sampling runs over the whole batch at once
(sampling.choose_tokens). Nothing in a step costs Python work proportional to a sequence's length.
"""

from __future__ import annotations

import heapq
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...data.text import tokenizer_from_json
from ...errors import InputError
from ..base import Predictor
from ...models.sampling import BatchOptions, SamplingOptions, choose_tokens

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


def cache_names(n_layer: int, prefix: str) -> list[str]:
    """The decode graph's per-layer cache inputs (prefix "past") or outputs ("present"): keys, then values."""
    return [f"{prefix}_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


class KVSlots:
    """Keys and values of the sequences one thread steps: one array [L, 2, slots, H, context, D], allocated at the
    first prefill (the graph's output gives L, H, D and the dtype) and doubled when every slot is taken. A slot's
    entries 0..length-1 are its sequence's window; the rest is stale and masked. Each cache[l, k/v, :n] is one
    block [n, H, context, D]: a decode step hands the graph slots 0..n-1 of each layer by address, so the lowest
    free slot is taken first and `compact` moves sequences down into freed ones."""

    def __init__(self, context: int):
        self.context = context
        self.cache: np.ndarray | None = None
        self.free: list[int] = []  # a heap of the slots not owned by a sequence
        # `release` may run on another thread (a dropped sequence's finalizer), or on this one, inside `allocate` or
        # `compact`, when a garbage collection they trigger frees a dropped sequence: re-entrant.
        self.lock = threading.RLock()
        self.buffers: dict[int, DecodeBuffers] = {}

    def decode_buffers(self, rows: int, vocab_size: int) -> "DecodeBuffers":
        """The arrays a decode step over slots 0..rows-1 reads and writes, made once per `rows` (and again when the
        cache grows): the same arrays step after step, so the runner binds them to the graph only once."""
        buffers = self.buffers.get(rows)
        if buffers is None:
            layers = self.cache.shape[0]
            tokens, positions = np.zeros((rows, 1), np.int64), np.zeros((rows, 1), np.int64)
            caches = [self.cache[layer, kind, :rows] for layer in range(layers) for kind in (0, 1)]
            logits = np.zeros((rows, vocab_size), np.float32)
            buffers = self.buffers[rows] = DecodeBuffers(
                tokens, positions,
                {"tokens": tokens, "positions": positions, **dict(zip(cache_names(layers, "past"), caches))},
                [logits, *caches])
        return buffers

    def allocate(self, kv: np.ndarray) -> int:
        """The lowest free slot, for keys/values shaped like the prefill output `kv` [L, 2, B, H, T, D]."""
        with self.lock:
            if self.cache is None:
                L, two, _, H, _, D = kv.shape
                self.cache = np.zeros((L, two, 1, H, self.context, D), kv.dtype)
                self.free = [0]
            if not self.free:
                n = self.cache.shape[2]
                grown = np.zeros((*self.cache.shape[:2], 2 * n, *self.cache.shape[3:]), self.cache.dtype)
                grown[:, :, :n] = self.cache
                self.cache = grown
                self.buffers.clear()  # their cache views are of the old array
                for slot in range(n, 2 * n):  # merged: a slot freed meanwhile (re-entrant release) stays free
                    heapq.heappush(self.free, slot)
            return heapq.heappop(self.free)

    def release(self, slot: int) -> None:
        with self.lock:
            heapq.heappush(self.free, slot)

    def compact(self, sequences: list["Sequence"]) -> None:
        """Move the sequences in the highest slots into lower free ones (one slot's copy each, once per sequence
        that left below them), so that a step over slots 0..highest carries few slots it does not step."""
        with self.lock:
            for sequence in sorted(sequences, key=lambda s: s.slot, reverse=True):
                if not self.free or self.free[0] > sequence.slot:
                    break
                slot = heapq.heappop(self.free)
                self.cache[:, :, slot, :, :sequence.length] = self.cache[:, :, sequence.slot, :, :sequence.length]
                heapq.heappush(self.free, sequence.slot)
                sequence.release.detach()
                sequence.slot = slot
                sequence.release = weakref.finalize(sequence, self.release, slot)


@dataclass
class DecodeBuffers:
    tokens: np.ndarray  # [rows, 1] int64
    positions: np.ndarray  # [rows, 1] int64
    inputs: dict[str, np.ndarray]  # the decode graph's: tokens, positions, each layer's cache[layer, k/v, :rows]
    out: list[np.ndarray]  # its outputs: logits [rows, V] float32, then the same cache views (written in place)


@dataclass
class Sequence:
    item: GenerationItem
    rng: np.random.Generator
    tokens: list[int]  # prompt and generated
    options: np.ndarray  # the sampling options as one row (SamplingOptions.row), stacked at each step
    window_start: int = 0  # index in `tokens` of the cache's first entry (moves when the context overflows)
    slots: KVSlots | None = None  # where its keys/values live (the pool of the thread that prefilled it)
    slot: int = -1
    length: int = 0  # keys/values in its slot; 0: needs a prefill
    release: weakref.finalize | None = None  # frees the slot once: at the end, or when the sequence is dropped
    seen: np.ndarray | None = None  # [V] bool, tokens in the text so far (kept only when a penalty is set)
    produced: np.ndarray | None = None  # [V] bool, tokens generated so far (idem)
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
        self.vocab_size = int(spec["vocab_size"])
        self.local = threading.local()  # each stepping thread's KVSlots
        # Packages exported before the in-place decode graph take the gathered past and a mask instead.
        decode_inputs = [i["name"] for i in spec.get("graphs", {}).get("decode", {}).get("inputs", [])]
        self.gathered_decode = "past" in decode_inputs

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
        sequence = Sequence(item, np.random.default_rng(item.seed), list(item.prompt_ids), item.options.row())
        if item.options.penalised:
            sequence.seen = np.zeros(self.vocab_size, bool)
            sequence.seen[np.asarray(item.prompt_ids, np.int64)] = True
            sequence.produced = np.zeros(self.vocab_size, bool)
        return sequence

    def kv_slots(self) -> KVSlots:
        """This thread's cache: the scheduler's worker and each batch-inference thread step their own sequences."""
        slots = getattr(self.local, "slots", None)
        if slots is None:
            slots = self.local.slots = KVSlots(self.context)
        return slots

    def step(self, sequences: list[Sequence], run) -> list[Delta]:
        """One new token for every unfinished sequence in `sequences` (in order): those without keys/values are
        prefilled, the others decoded, each group in one batched graph call; then one batched draw for all."""
        fresh = [s for s in sequences if s.length == 0 and not s.finished]
        running = [s for s in sequences if s.length > 0 and not s.finished]
        active, logits = [], []
        if fresh:
            logits.append(self.prefill(fresh, run))
            active += fresh
        groups: dict[int, list[Sequence]] = {}
        for sequence in running:  # one group unless sequences were prefilled on different threads
            groups.setdefault(id(sequence.slots), []).append(sequence)
        for group in groups.values():
            logits.append(self.decode(group, run))
            active += group
        chosen = dict(zip(map(id, active), self.choose(active, np.concatenate(logits)) if active else []))
        deltas = []
        for sequence in sequences:
            token = chosen.get(id(sequence))
            if token is None:
                deltas.append(Delta("", None, sequence.finished, sequence.finish_reason))
            else:
                deltas.append(self.advance(sequence, int(token)))
        return deltas

    def choose(self, sequences: list[Sequence], logits: np.ndarray) -> np.ndarray:
        """The next token of each sequence from logits [B, V], in one batched draw."""
        options = BatchOptions(np.stack([s.options for s in sequences]))
        seen = produced = None
        if any(s.seen is not None for s in sequences):
            blank = np.zeros(logits.shape[1], bool)
            seen = np.stack([blank if s.seen is None else s.seen for s in sequences])
            produced = np.stack([blank if s.produced is None else s.produced for s in sequences])
        return choose_tokens(logits, options, lambda rows: [sequences[r].rng.random() for r in rows], seen,
                             produced)

    def prefill(self, sequences: list[Sequence], run) -> np.ndarray:
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
        slots = self.kv_slots()
        for b, (sequence, window) in enumerate(zip(sequences, windows)):
            if sequence.slots is None:
                sequence.slots, sequence.slot = slots, slots.allocate(kv)
                sequence.release = weakref.finalize(sequence, slots.release, sequence.slot)
            n = len(window)
            sequence.slots.cache[:, :, sequence.slot, :, :n] = kv[:, :, b, :, T - n:]
            sequence.length = n
        return np.asarray(logits)

    def decode(self, sequences: list[Sequence], run) -> np.ndarray:
        """One token for each of `sequences` (all in one KVSlots), logits [B, V] in their order. The graph gets
        slots 0..n-1 of each layer's keys and values by address (n: the highest slot stepped, plus one) and writes
        each row's new entry into them in place (Decode in task.py). A row whose slot is not stepped here (a
        sequence prefilled in this step, or dropped and not yet freed) writes into its slot's last entry, which is
        stale for every sequence that will decode again: one that decodes has length <= context - 1."""
        if self.gathered_decode:
            return self.decode_gathered(sequences, run)
        slots = sequences[0].slots
        slots.compact(sequences)
        rows = max(s.slot for s in sequences) + 1
        index = np.array([s.slot for s in sequences])
        buffers = slots.decode_buffers(rows, self.vocab_size)
        buffers.tokens.fill(0)
        buffers.positions.fill(self.context - 1)
        buffers.tokens[index, 0] = [s.tokens[-1] for s in sequences]
        buffers.positions[index, 0] = [s.length for s in sequences]
        logits = run(buffers.inputs, graph="decode", out=buffers.out)[0]
        for sequence in sequences:
            sequence.length += 1
        return logits[index]  # a copy: the buffer is written again at the next step

    def decode_gathered(self, sequences: list[Sequence], run) -> np.ndarray:
        """`decode` for packages whose decode graph takes the past gathered: the slots' first S entries (S: the longest
        length) as `past`, each row masked past its own length, the new token's key/value at index S."""
        cache = sequences[0].slots.cache
        index = np.array([s.slot for s in sequences])
        lengths = np.array([s.length for s in sequences])
        S = int(lengths.max())
        past = cache[:, :, index, :, :S]  # [L, 2, B, H, S, D], one gather
        mask = np.arange(S + 1) < lengths[:, None]
        mask[:, S] = True
        tokens = np.array([[s.tokens[-1]] for s in sequences], np.int64)
        logits, kv = run({"tokens": tokens, "positions": lengths[:, None], "mask": mask, "past": past},
                         graph="decode")
        cache[:, :, index, :, lengths] = kv[:, :, :, :, 0].transpose(2, 0, 1, 3, 4)  # [B, L, 2, H, D], one scatter
        for sequence in sequences:
            sequence.length += 1
        return np.asarray(logits)

    def advance(self, sequence: Sequence, token: int) -> Delta:
        """Extend the text by the chosen token, check the stop conditions; the text delta to hand out."""
        item = sequence.item
        if token == self.tokenizer.eot_id:
            return self.finish(sequence, "stop", None)
        sequence.tokens.append(token)
        sequence.generated.append(token)
        if sequence.seen is not None:
            sequence.seen[token] = sequence.produced[token] = True
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
        if sequence.length + 1 > self.context:
            # The window is full: keep the last half of the context and prefill it again (into the same slot) at
            # the next step; positions restart at 0, as the model saw them in training.
            sequence.window_start = len(sequence.tokens) - self.context // 2
            sequence.length = 0
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
        sequence.finished, sequence.finish_reason, sequence.length = True, reason, 0
        if sequence.release is not None:
            sequence.release()  # the slot is free for the next sequence at once
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
