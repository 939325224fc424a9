"""A two-tower retrieval model (Covington et al. 2016; Yi et al. 2019, "Sampling-Bias-Corrected Neural Modeling
for Large Corpus Item Recommendations"), trained with in-batch sampled softmax and the logQ correction.

- User tower: the mean of the user's history item embeddings and the most recent item's embedding, through an
  MLP, L2-normalised. The mean is a running one (a cumulative sum), so one pass trains every prefix of a
  history at once, as SASRec's causal attention does.
- Item tower: an item id embedding plus a projection of its genres (multi-hot, row-normalised), L2-normalised.
- Score: the cosine of the two, over a temperature. The item vectors do not depend on the user, so serving puts
  them in a faiss index (retrieval.py) and the exported graph is the user tower alone.

In-batch negatives are the batch's other target items; a popular item is a negative more often than its share
of the catalogue, which biases the model against it. The logQ correction subtracts log q(item), the item's
sampling probability (its share of training interactions), from each logit (Yi et al. 2019, eq. 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sampled_softmax_loss(users: torch.Tensor, item_vectors: torch.Tensor, positives: torch.Tensor,
                         log_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """users [N, C] against the batch's distinct positive items as candidates; positives [N] are 0-based item
    rows of item_vectors [n, C]; log_q [n] the log sampling probability of each item."""
    candidates, label = torch.unique(positives, return_inverse=True)  # each distinct item once: no false negative
    logits = users @ item_vectors[candidates].T / temperature - log_q[candidates]  # [N, U]
    return F.cross_entropy(logits.float(), label)


class TwoTower(nn.Module):
    def __init__(self, n_items: int, genres: torch.Tensor, popularity: torch.Tensor, dim: int = 64,
                 dropout: float = 0.2, temperature: float = 0.05):
        super().__init__()
        self.n_items, self.temperature, self.dropout = n_items, temperature, dropout
        self.history_items = nn.Embedding(n_items + 1, dim, padding_idx=0)  # the user tower's input table
        self.user_mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.item_ids = nn.Embedding(n_items, dim)
        self.item_genres = nn.Linear(genres.shape[1], dim, bias=False)
        self.register_buffer("genres", genres / genres.sum(1, keepdim=True).clamp(min=1))  # [n, G]
        q = (popularity.double() + 1) / (popularity.double() + 1).sum()  # +1: an item never trained on has q > 0
        self.register_buffer("log_q", q.log().float())  # [n]
        for table in (self.history_items, self.item_ids):
            nn.init.normal_(table.weight, std=0.1)
        with torch.no_grad():
            self.history_items.weight[0].zero_()

    def item_vectors(self) -> torch.Tensor:
        """[n, C], unit length."""
        return F.normalize(self.item_ids.weight + self.item_genres(self.genres), dim=-1)

    def user_states(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded -> [B, L, C] unit user vectors after each prefix (the last: the whole history)."""
        e = F.dropout(self.history_items(history), self.dropout, self.training)  # padding rows are zero
        count = (history != 0).float().cumsum(1).clamp(min=1).unsqueeze(-1)  # [B, L, 1]
        mean = e.cumsum(1) / count
        return F.normalize(self.user_mlp(torch.cat([mean, e], -1)), dim=-1)

    def user_vector(self, history: torch.Tensor) -> torch.Tensor:
        return self.user_states(history)[:, -1]

    def forward(self, history: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Exact scores of every item [B, n]; with training `targets` [B, L] (the history shifted by one), the
        sampled-softmax loss of the next item at every real position instead."""
        if targets is not None:
            real = targets != 0
            users = self.user_states(history)[real]  # [N, C]
            return sampled_softmax_loss(users, self.item_vectors(), targets[real] - 1, self.log_q, self.temperature)
        return self.user_vector(history) @ self.item_vectors().T / self.temperature


class UserTower(nn.Module):
    """The exported graph of a two-tower model: history [B, L] -> user vector [B, C]."""

    def __init__(self, model: TwoTower):
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.model.user_vector(history)
