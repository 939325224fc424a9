"""Full-ranking metrics for next-item recommendation: every item is a candidate, the user's seen items are not.

No sampled negatives: Krichene & Rendle 2020 ("On Sampled Metrics for Item Recommendation") show sampled metrics
can reorder models. Ties count against the target (pessimistic): a model scoring everything equal ranks it last,
not first.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

K = 10


def mask_seen(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """scores [B, n] (column j: item j + 1), seen [B, S] item indices (0 pads) -> seen items set to -inf."""
    padded = torch.cat([torch.zeros_like(scores[:, :1]), scores.float()], 1)
    padded = padded.scatter(1, seen, float("-inf"))
    return padded[:, 1:]


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target item (1..n) among all items; ties ranked above it."""
    target_score = scores.gather(1, (target - 1)[:, None])
    return (scores >= target_score).sum(1) - 1


class RankingMetrics:
    """HR@10, NDCG@10, MRR, catalogue coverage of the top-10 lists and their mean popularity, summed over batches
    (and across ranks under DDP)."""

    def __init__(self, popularity: torch.Tensor, n_users: int):
        self.popularity = popularity.float()  # [n] training interactions per item
        self.n_users = max(n_users, 1)
        self.sums = torch.zeros(5, dtype=torch.float64)  # users, hits, ndcg, reciprocal rank, popularity of top-k
        self.recommended = torch.zeros(len(popularity), dtype=torch.float64)

    def update(self, scores: torch.Tensor, target: torch.Tensor, seen: torch.Tensor) -> None:
        scores = mask_seen(scores, seen)
        rank = target_ranks(scores, target).double().cpu()
        hit = rank < K
        values, top = scores.topk(min(K, scores.shape[1]), dim=1)
        top, listed = top.cpu(), values.isfinite().cpu()  # a seen item is never recommended, even to fill a list
        popularity = (self.popularity[top].double() * listed).sum(1) / listed.sum(1).clamp(min=1)
        self.sums += torch.stack([torch.tensor(float(len(rank)), dtype=torch.float64), hit.double().sum(),
                                  (hit.double() / torch.log2(rank + 2)).sum(), (1 / (rank + 1)).sum(),
                                  popularity.sum()])
        self.recommended += torch.bincount(top[listed], minlength=len(self.popularity)).double()

    def compute(self) -> dict[str, float]:
        sums, recommended = self.sums.clone(), self.recommended.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(recommended)
        users = max(sums[0].item(), 1.0)
        return {f"hr@{K}": sums[1].item() / users, f"ndcg@{K}": sums[2].item() / users, "mrr": sums[3].item() / users,
                f"coverage@{K}": (recommended > 0).double().mean().item(),
                # the share of training users who interacted with a recommended item, averaged: 0 = niche, 1 = all
                f"popularity@{K}": sums[4].item() / users / self.n_users,
                "users": users}


def ndcg_of_rank(rank: int) -> float:
    """One user's NDCG@10 for a 0-based rank (for tests and hand checks)."""
    return 1 / math.log2(rank + 2) if rank < K else 0.0
