"""Self-critical sequence training (Rennie et al. 2017): fine-tune a captioner on the metric it is judged by.

For each image, draw K captions from the model, score each by CIDEr-D against the image's references, and raise
the log-probability of the captions that beat the others: the baseline of each sample is the mean reward of the
image's other K - 1 samples (the "new self-critical" baseline of Luo 2020, which needs no extra greedy decode).
The reward is REINFORCE's, so the gradient flows only through the log-probabilities of the sampled tokens, which
one teacher-forced pass over the samples gives back.

CIDEr-D's document frequencies come from the whole training set, not the batch (a batch of 64 images is too
small a corpus for the idf to mean anything), as in the reference implementations.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs

IGNORE = -100


class CorpusCiderD(CiderScorer):
    """pycocoevalcap's CIDEr-D with document frequencies and reference length fixed to a corpus. Its
    compute_cider() sets ref_len to log(len(this batch)): the property keeps the corpus's instead."""

    ref_len = property(lambda self: self._corpus_log_len, lambda self, value: None)

    def __init__(self, document_frequency, corpus_log_len: float):
        self._corpus_log_len = corpus_log_len
        super().__init__(n=4, sigma=6.0)
        self.document_frequency = document_frequency

    @staticmethod
    def corpus_statistics(references: list[list[str]]) -> tuple[dict, float]:
        """Document frequency of every n-gram over the images (each image's references count once) and log N."""
        scorer = CiderScorer(n=4, sigma=6.0)
        scorer.crefs = [cook_refs(refs) for refs in references]
        scorer.compute_doc_freq()
        return scorer.document_frequency, float(np.log(len(references)))

    def scores(self, captions: list[str], references: list[list[str]]) -> np.ndarray:
        for caption, refs in zip(captions, references):
            self.cook_append(caption, refs)
        return np.asarray(self.compute_cider(), dtype=np.float64)


@torch.no_grad()
def sample_captions(decoder, memory: torch.Tensor, max_length: int, start_id: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """One caption per row of memory [N, M, C], drawn token by token at temperature 1 with the KV cache:
    tokens [N, max_length], the end token included, -1 after it."""
    N = memory.shape[0]
    memory_kv = decoder.memory_cache(memory)
    token = torch.full((N, 1), start_id, dtype=torch.long, device=memory.device)
    finished = torch.zeros(N, dtype=torch.bool, device=memory.device)
    past, out = None, []
    for position in range(max_length):
        positions = torch.full((N, 1), position, dtype=torch.long, device=memory.device)
        logits, kv = decoder(token, positions=positions, past=past, memory_kv=memory_kv, return_cache=True)
        past = kv if past is None else torch.cat([past, kv], dim=-2)
        probs = F.softmax(logits[:, -1].float(), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)
        out.append(token.squeeze(1).masked_fill(finished, -1))
        finished |= token.squeeze(1) == start_id  # the start token also ends a caption
        if finished.all():
            break
    tokens = torch.stack(out, dim=1)
    return F.pad(tokens, (0, max_length - tokens.shape[1]), value=-1)


def teacher_inputs(tokens: torch.Tensor, start_id: int) -> torch.Tensor:
    """The decoder inputs that reproduce sampled captions [N, T] (-1 after the end): the start token, then each
    caption shifted right."""
    return torch.cat([torch.full_like(tokens[:, :1], start_id), tokens[:, :-1]], dim=1).clamp(min=0)


def sequence_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each caption [N, T] (-1 after its end) from teacher-forced logits [N, T, V]."""
    targets = tokens.masked_fill(tokens < 0, IGNORE)
    token_log_probs = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                       reduction="none").view_as(tokens)
    return token_log_probs.sum(dim=1)


def leave_one_out_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [B, K] -> each sample's reward minus the mean of its image's other K - 1 samples."""
    K = rewards.shape[1]
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)
