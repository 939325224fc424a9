"""Choosing the next token from logits: penalties, temperature, top-k, top-p (nucleus; Holtzman et al. 2019) and
min-p (Nguyen et al. 2024) filters, then a draw from the sequence's own random generator.

Each sequence samples with its own numpy Generator seeded from its request, so its text does not depend on which
other sequences share its batch.
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


def apply_penalties(logits: np.ndarray, previous: np.ndarray, generated: np.ndarray,
                    options: SamplingOptions) -> np.ndarray:
    """`previous`: every token of the text so far (prompt and generated, for the repetition penalty, as
    Hugging Face applies it); `generated`: the generated ones (for the presence penalty, as OpenAI applies it)."""
    if options.repetition_penalty != 1.0 and len(previous):
        seen = np.unique(previous)
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / options.repetition_penalty, values * options.repetition_penalty)
    if options.presence_penalty and len(generated):
        logits[np.unique(generated)] -= options.presence_penalty
    return logits


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """Logits [V] with the tokens outside the top-k / nucleus / min-p sets at -inf (at least one always kept)."""
    logits = logits.astype(np.float64, copy=True)
    if top_k and top_k < len(logits):
        kth = np.partition(logits, -top_k)[-top_k]
        logits[logits < kth] = -np.inf
    if top_p < 1.0 or min_p > 0.0:
        probs = softmax(logits)
        if min_p > 0.0:
            logits[probs < min_p * probs.max()] = -np.inf
        if top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass before it
            # already does
            drop = order[cumulative - probs[order] >= top_p]
            logits[drop] = -np.inf
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def choose_token(logits: np.ndarray, previous, generated, options: SamplingOptions,
                 rng: np.random.Generator) -> int:
    """`previous` and `generated`: token sequences (lists or arrays), read only when a penalty is set."""
    logits = logits.astype(np.float64, copy=True)
    if options.repetition_penalty != 1.0 or options.presence_penalty:
        logits = apply_penalties(logits, np.asarray(previous, np.int64), np.asarray(generated, np.int64), options)
    if options.temperature == 0:
        return int(np.argmax(logits))
    probs = softmax(filter_logits(logits / options.temperature, options.top_k, options.top_p, options.min_p))
    # Inverse-CDF draw: one uniform number per token, a fraction of Generator.choice's cost per call.
    return int(min(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"), len(probs) - 1))
