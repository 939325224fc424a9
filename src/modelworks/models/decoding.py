"""Beam search over any step-wise decoder, with a length penalty (Wu et al. 2016, GNMT: lp = ((5 + |Y|) / 6)^alpha).

The decoder is a callback, so the same search runs over eager PyTorch, TorchScript or ONNX Runtime, and over any
cache layout: `step(tokens, parents)` gets the last token of each live hypothesis and, for each, the index of the
hypothesis it continues in the previous call (the caller reorders its KV cache by `parents`), and returns
log-probabilities [k, V]. Hypotheses end on `end_token`, or at `max_length` tokens.

As in Hugging Face's BeamSearchScorer, each step looks at the 2 x beam best continuations and a hypothesis that
ends is kept only when it ranks within the beam, so beam 1 is exactly greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Hypothesis:
    tokens: list[int]  # without the end token
    log_prob: float  # sum of the tokens' log-probabilities (the end token's included when it ended)
    score: float  # log_prob / length penalty: what the beam ranks finished hypotheses by
    finished: bool  # False: cut at max_length


def length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(step: Callable[[np.ndarray, np.ndarray | None], np.ndarray], end_token: int, beam: int,
                max_length: int, alpha: float = 0.0, n: int = 1, first_tokens: np.ndarray | None = None
                ) -> list[Hypothesis]:
    """The `n` best hypotheses (best first). `first_tokens` [1]: the first input (the start token); the first call
    has one live hypothesis and parents None."""
    if not 1 <= n <= beam:
        raise ValueError(f"n: must be between 1 and beam={beam} (got {n})")
    alive_tokens: list[list[int]] = [[]]
    alive_log_prob = np.zeros(1)
    finished: list[Hypothesis] = []
    last = np.asarray(first_tokens if first_tokens is not None else [end_token], np.int64)
    parents = None
    for length in range(1, max_length + 1):
        log_probs = np.asarray(step(last, parents), np.float64)  # [k, V]
        V = log_probs.shape[1]
        total = (alive_log_prob[:, None] + log_probs).ravel()
        width = min(2 * beam, total.size)
        top = np.argpartition(-total, width - 1)[:width]
        top = top[np.argsort(-total[top], kind="stable")]
        next_tokens, next_log_prob, next_parents = [], [], []
        for rank, flat in enumerate(top):
            parent, token = divmod(int(flat), V)
            if token == end_token:
                if rank < beam:  # an ending outside the beam would not have been followed
                    tokens = alive_tokens[parent]
                    finished.append(Hypothesis(tokens, float(total[flat]),
                                               float(total[flat]) / length_penalty(len(tokens) + 1, alpha), True))
                continue
            next_tokens.append(alive_tokens[parent] + [token])
            next_log_prob.append(total[flat])
            next_parents.append(parent)
            if len(next_tokens) == beam:
                break
        if len(finished) >= beam or not next_tokens:
            best_alive = max(next_log_prob, default=-np.inf) / length_penalty(length + 1, alpha)
            worst_kept = sorted(h.score for h in finished)[-beam] if len(finished) >= beam else -np.inf
            if not next_tokens or best_alive <= worst_kept:
                break
        alive_tokens, alive_log_prob = next_tokens, np.array(next_log_prob)
        last, parents = np.array([t[-1] for t in next_tokens], np.int64), np.array(next_parents, np.int64)
    else:  # max_length reached: the live hypotheses end here too
        finished += [Hypothesis(t, float(lp), float(lp) / length_penalty(len(t), alpha), False)
                     for t, lp in zip(alive_tokens, alive_log_prob)]
    finished.sort(key=lambda h: -h.score)
    return finished[:n]

