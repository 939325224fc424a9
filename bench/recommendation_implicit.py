"""ALS and BPR from the `implicit` package on a split bench/recommendation.py wrote; run by that bench with the
Python of a separate virtual environment (implicit is no dependency of modelworks). Full ranking, seen items
masked, ties against the target: the same protocol as modelworks' metrics.

    python bench/recommendation_implicit.py SPLIT.json  ->  JSON: per model, a list of metrics per seed
                                                        (with each test user's NDCG@10)
"""

import json
import sys
import time

import numpy as np
import scipy.sparse as sp


def ranking_metrics(scores: np.ndarray, seen: list[list[int]], target: np.ndarray) -> dict:
    scores = scores.astype(np.float64).copy()
    for row, items in enumerate(seen):
        scores[row, items] = -np.inf
    target_score = scores[np.arange(len(target)), target]
    rank = (scores >= target_score[:, None]).sum(1) - 1
    hit = rank < 10
    ndcg = hit / np.log2(rank + 2)
    return {"hr@10": float(hit.mean()), "ndcg@10": float(ndcg.mean()), "mrr": float((1 / (rank + 1)).mean()),
            "per_user": ndcg.tolist()}


def main() -> None:
    import implicit
    from implicit.als import AlternatingLeastSquares
    from implicit.bpr import BayesianPersonalizedRanking

    split = json.loads(open(sys.argv[1]).read())
    n_items, train = split["n_items"], split["train"]  # 0-based item columns
    rows = np.repeat(np.arange(len(train)), [len(t) for t in train])
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, np.concatenate(train))),
                           shape=(len(train), n_items))
    users, target = np.array(split["test_users"]), np.array(split["test_target"])
    results = {"implicit": implicit.__version__, "als": [], "bpr": []}
    models = {"als": lambda seed: AlternatingLeastSquares(factors=64, regularization=0.05, alpha=2.0, iterations=15,
                                                          random_state=seed),
              "bpr": lambda seed: BayesianPersonalizedRanking(factors=64, learning_rate=0.01, regularization=0.01,
                                                              iterations=100, random_state=seed)}
    for seed in split.get("seeds", [0]):
        for name, make in models.items():
            tic = time.perf_counter()
            model = make(seed)
            model.fit(matrix, show_progress=False)
            fit_s = time.perf_counter() - tic
            user_factors, item_factors = np.asarray(model.user_factors), np.asarray(model.item_factors)
            scores = user_factors[users] @ item_factors.T
            results[name].append({**ranking_metrics(scores, split["test_seen"], target), "fit_s": fit_s})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
