"""Choosing the next token from logits: penalties, temperature, top-k, top-p (nucleus; Holtzman et al. 2019) and
min-p (Nguyen et al. 2024) filters, then a draw from each sequence's own random generator.

`choose_tokens` does it for a whole running batch at once: one array operation per stage over [B, V] logits, each
row with its own options (per-row temperature, k, p, penalties), so a step costs the same few numpy calls whatever
the batch size. Every operation is row-wise and each row draws its one uniform number from its own numpy
Generator seeded from its request, so a sequence's text does not depend on which other sequences share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingOptions:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019): > 1 discourages tokens already in the text
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0

    def row(self) -> np.ndarray:
        """[6] float64 in BatchOptions' field order: a sequence keeps its row, a step stacks the rows."""
        return np.array([self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                         self.presence_penalty], np.float64)


class BatchOptions:
    """The options of B rows as columns [B] of one array [B, 6] (SamplingOptions.row stacked)."""

    def __init__(self, rows: np.ndarray):
        self.temperature, top_k, self.top_p, self.min_p, self.repetition_penalty, self.presence_penalty = rows.T
        self.top_k = top_k.astype(np.int64)

    @classmethod
    def of(cls, options: list[SamplingOptions]) -> "BatchOptions":
        return cls(np.stack([o.row() for o in options]))


def apply_penalties(logits: np.ndarray, seen: np.ndarray, generated: np.ndarray, options: BatchOptions) -> None:
    """In place on logits [B, V]. `seen` [B, V] bool: tokens anywhere in the text so far (prompt and generated, for
    the repetition penalty, as Hugging Face applies it); `generated` [B, V] bool: tokens generated so far (for the
    presence penalty, as OpenAI applies it)."""
    repetition = options.repetition_penalty[:, None]
    penalised = np.where(logits > 0, logits / repetition, logits * repetition)
    np.copyto(logits, penalised, where=seen & (repetition != 1.0))
    logits -= options.presence_penalty[:, None] * generated


def filter_batch(logits: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray) -> np.ndarray:
    """Logits [B, V] (float64) with each row's tokens outside its top-k / nucleus / min-p sets at -inf (the most
    probable token always kept); in place. Rows with a filter off are left alone."""
    B, V = logits.shape
    k_on = (top_k > 0) & (top_k < V)
    if k_on.all() and (top_k == top_k[0]).all():  # the usual case, one k for every row: one partition
        kth = np.partition(logits, V - top_k[0], axis=1)[:, V - top_k[0]]
        logits[logits < kth[:, None]] = -np.inf
    elif k_on.any():
        # the k largest of each row: a partition to the largest k in the batch (O(V)), then a sort of those few
        k = np.where(k_on, top_k, 1)
        largest = -np.sort(np.partition(-logits, k.max() - 1, axis=1)[:, :k.max()], axis=1)
        kth = largest[np.arange(B), k - 1]
        logits[k_on[:, None] & (logits < kth[:, None])] = -np.inf
    p_on, min_on = top_p < 1.0, min_p > 0.0
    if p_on.any() or min_on.any():
        probs = softmax(logits)
        if min_on.any():
            logits[probs < (min_p * probs.max(axis=1))[:, None]] = -np.inf
        if p_on.any():
            order = np.argsort(-probs, axis=1, kind="stable")
            sorted_probs = np.take_along_axis(probs, order, axis=1)
            # keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass before it
            # already does
            drop_sorted = (np.cumsum(sorted_probs, axis=1) - sorted_probs >= top_p[:, None]) & p_on[:, None]
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, axis=1)
            logits[drop] = -np.inf
    return logits


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """One row [V]: `filter_batch` for a single sequence (a copy, float64)."""
    row = np.array(logits, np.float64).reshape(1, -1)
    return filter_batch(row, np.array([top_k]), np.array([top_p], np.float64), np.array([min_p], np.float64))[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def choose_tokens(logits: np.ndarray, options: BatchOptions, uniform, seen: np.ndarray | None = None,
                  generated: np.ndarray | None = None) -> np.ndarray:
    """The next token of each row [B] from logits [B, V]. `uniform(rows)` gives one number in [0, 1) for each
    sampled (not greedy) row, from that row's own generator; `seen`/`generated` [B, V] bool are read when a
    penalty is set."""
    logits = logits.astype(np.float64)  # a copy: the caller's logits stay as they are
    if seen is not None:
        apply_penalties(logits, seen, generated, options)
    greedy = options.temperature == 0
    if greedy.all():
        return np.argmax(logits, axis=1)
    tokens = np.argmax(logits, axis=1) if greedy.any() else None
    sampled = np.flatnonzero(~greedy)
    rows = sampled if tokens is not None else slice(None)  # the usual case, no row greedy: views, not copies
    x = filter_batch(logits[rows] / options.temperature[rows, None], options.top_k[rows], options.top_p[rows],
                     options.min_p[rows])
    # Inverse-CDF draw on the unnormalised distribution: one uniform number per row, a fraction of
    # Generator.choice's cost.
    cumulative = np.cumsum(np.exp(x - x.max(axis=1, keepdims=True)), axis=1)
    target = np.asarray(uniform(sampled), np.float64) * cumulative[:, -1]
    drawn = np.minimum((cumulative <= target[:, None]).sum(axis=1), x.shape[1] - 1)
    if tokens is None:
        return drawn
    tokens[sampled] = drawn
    return tokens


def choose_token(logits: np.ndarray, previous, generated, options: SamplingOptions,
                 rng: np.random.Generator) -> int:
    """One sequence: `previous` and `generated` are token sequences (lists or arrays), read only when a penalty
    is set."""
    logits = np.asarray(logits).reshape(1, -1)
    seen = produced = None
    if options.penalised:
        seen, produced = (np.zeros(logits.shape, bool) for _ in range(2))
        seen[0, np.asarray(previous, np.int64)] = True
        produced[0, np.asarray(generated, np.int64)] = True
    batch = BatchOptions.of([options])
    return int(choose_tokens(logits, batch, lambda rows: [rng.random() for _ in rows], seen, produced)[0])
