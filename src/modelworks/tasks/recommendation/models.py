"""Recommenders scoring every item from a user's history: EASE and SASRec.

Both take the same input, a left-padded history of item indices [B, L] (0 pads, items are 1..n), and return
scores over all n items [B, n] (column j is item j + 1): one exported graph shape for every model.

- EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): an item-item weight matrix with a
  zero diagonal, fitted in closed form, B = I - P diagDiag(1 / diag(P)), P = (X^T X + lambda I)^-1.
- SASRec (Kang & McAuley 2018), trained with full-softmax cross-entropy over all items rather than sampled
  binary cross-entropy (Klenitskiy & Vasilev 2023, "Turning Dross Into Gold Loss: is BERT4Rec really better than
  SASRec?"), on the shared causal decoder of models/transformer.py (the GPT's, without its LM head). With many
  items the full softmax dominates a step (ml-latest-small: 9.7k items x 6.4k positions, ~0.7 s a step here), so
  `negatives` swaps it for a sampled softmax over that many uniformly drawn items, corrected to estimate the full
  one (the paper's sampled variant; gSASRec, Petrov & Macdonald 2023, makes the same case for many negatives).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...models.transformer import Decoder, DecoderConfig


def multi_hot(history: torch.Tensor, n_items: int) -> torch.Tensor:
    """[B, L] item indices (0 pads) -> [B, n] 0/1 rows; column j is item j + 1."""
    rows = torch.zeros(history.shape[0], n_items + 1, device=history.device)
    rows = rows.scatter(1, history, torch.ones_like(history, dtype=rows.dtype))
    return rows[:, 1:]


class EASE(nn.Module):
    def __init__(self, n_items: int):
        super().__init__()
        self.n_items = n_items
        self.weight = nn.Parameter(torch.zeros(n_items, n_items))  # B: row i says how item i votes for each item

    def forward(self, history: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, n]; with training `targets` (the history shifted by one), the loss instead."""
        if targets is not None:
            return self.loss(torch.cat([history, targets[:, -1:]], 1))
        x = multi_hot(history, self.n_items)
        weight = self.weight * (1 - torch.eye(self.n_items, device=x.device))  # the constraint diag(B) = 0
        return x @ weight

    def loss(self, history: torch.Tensor) -> torch.Tensor:
        """EASE's objective per user, ||x - x B||^2 (the L2 term is the optimizer's weight decay): for the rare
        run that trains it by gradient steps; `fit` solves it exactly."""
        x = multi_hot(history, self.n_items)
        return ((x - x @ (self.weight * (1 - torch.eye(self.n_items, device=x.device)))) ** 2).sum(1).mean()

    @torch.no_grad()
    def fit(self, x: torch.Tensor, l2: float) -> None:
        """The closed form on the user-item matrix x [users, n] (float64 for the inverse: lambda can be small
        against X^T X's largest entries)."""
        gram = (x.T.double() @ x.double())
        gram += l2 * torch.eye(self.n_items, dtype=gram.dtype, device=gram.device)
        p = torch.linalg.inv(gram)
        b = -p / torch.diagonal(p)
        b.fill_diagonal_(0.0)
        self.weight.copy_(b.to(self.weight.dtype))


class SASRec(nn.Module):
    """The shared decoder (models/transformer.py) without its LM head, reading item embeddings; its states are
    scored against the same item table (tied, as in the paper). Learned positions count from the user's first
    item in the window, so left padding changes nothing: a padded history scores as the bare one does."""

    def __init__(self, n_items: int, max_len: int, dim: int = 64, layers: int = 2, heads: int = 2,
                 dropout: float = 0.2, negatives: int = 0):
        super().__init__()
        self.n_items = n_items
        self.negatives = negatives  # 0 (or >= n_items): the full softmax
        # SASRec's block: LayerNorm with biases, GELU MLP, no QK-norm, learned positions, embeddings * sqrt(C)
        self.decoder = Decoder(DecoderConfig(
            vocab_size=n_items + 1, context=max_len, n_layer=layers, n_head=heads, n_embd=dim, norm="layernorm",
            positions="learned", mlp="gelu", qk_norm=False, bias=True, dropout=dropout, zero_init_proj=False,
            lm_head=False, embed_scale=True))
        with torch.no_grad():
            self.decoder.embed.weight[0].zero_()  # index 0 pads (masked as a key; never scored)

    def hidden(self, history: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """[B, L] -> [B, L, C]: the state after each position (left padding: the last is the most recent); with
        last_only, [B, 1, C], the last position's alone (what scoring the next item reads)."""
        real = history != 0
        positions = (real.long().cumsum(1) - 1).clamp(min=0)  # 0 at the first real item of each row
        return self.decoder(history, positions=positions, mask=real, last_only=last_only)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of every item (the tied input embeddings), [..., n]."""
        return h @ self.decoder.embed.weight[1:].T

    def forward(self, history: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, n] of the next item; with training `targets` [B, L], the loss instead."""
        if targets is not None:
            return self.loss(history, targets)
        return self.logits(self.hidden(history, last_only=True)[:, -1])

    def loss(self, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the next item at every real position (Klenitskiy & Vasilev 2023): over every item, or
        sampled (`negatives`)."""
        real = targets != 0
        h = self.hidden(history)[real]  # [N, C]: only positions with a next item, not the padding
        if 0 < self.negatives < self.n_items:
            return sampled_cross_entropy(h, self.decoder.embed.weight[1:], targets[real] - 1, self.negatives)
        return F.cross_entropy(self.logits(h).float(), targets[real] - 1)


def sampled_cross_entropy(h: torch.Tensor, items: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax cross-entropy of `target` [N] among the item table `items` [n, C], its normaliser estimated from `k`
    items drawn uniformly (one draw shared by the batch, so one [N, k] matmul). A drawn item equal to a row's target
    is masked for that row; the others' exp-scores, scaled by n / k, estimate the sum over every other item (the
    log-Q correction of a uniform proposal), so the loss tracks the full softmax's instead of a k-way one."""
    drawn = torch.randint(0, items.shape[0], (k,), device=h.device)
    positive = (h * items[target]).sum(-1, keepdim=True)  # [N, 1]
    negative = h @ items[drawn].T + math.log(items.shape[0] / k)  # [N, k]
    negative = negative.masked_fill(drawn[None, :] == target[:, None], float("-inf"))
    logits = torch.cat([positive, negative], dim=1).float()
    return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long, device=h.device))


class MostPopular(nn.Module):
    """The baseline: every user gets the items with the most training interactions (their count as the score)."""

    def __init__(self, n_items: int):
        super().__init__()
        self.n_items = n_items
        self.register_buffer("counts", torch.zeros(n_items))

    def forward(self, history: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is not None:
            raise RuntimeError("most-popular is counted, not trained by steps (model.name=most-popular trains in "
                               "closed form)")
        return self.counts.expand(history.shape[0], -1) + 0 * history[:, :1].float()

    @torch.no_grad()
    def fit(self, x: torch.Tensor, l2: float = 0.0) -> None:
        self.counts.copy_(x.sum(0).to(self.counts.dtype))
