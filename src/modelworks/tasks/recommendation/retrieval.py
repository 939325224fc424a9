"""Approximate nearest-neighbour retrieval of item vectors by inner product, on faiss (Johnson et al. 2019).

A two-tower model's item vectors go into an index once; a user vector then fetches its candidate items, which
the predictor re-scores exactly. Index kinds:
- `flat`: exact search (a matrix product); the fastest choice up to ~100k items on a CPU;
- `ivf`: inverted lists over k-means cells (IndexIVFFlat); a query scans `nprobe` of `nlist` cells;
- `hnsw`: a navigable small-world graph (Malkov & Yashunin 2018); no training, slower to build.
`auto` picks `flat` below AUTO_IVF_ITEMS items and `ivf` above.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import PackageError

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
AUTO_IVF_ITEMS = 100_000  # below this, exact search costs about a millisecond per query: no index needed


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise PackageError("two-tower retrieval needs faiss; install it with pip install 'modelworks[rec]' "
                           "(faiss-cpu)") from None
    return faiss


def build_index(vectors: np.ndarray, kind: str = "auto", nlist: int = 0, nprobe: int = 32, hnsw_m: int = 32,
                ef_search: int = 128, seed: int = 0):
    """An inner-product index over `vectors` [n, d]. `nlist` 0: sqrt(n) cells (k-means trains on at most 256 points
    a cell, so this keeps the build to seconds at 1M items)."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"retrieval index: {kind!r} is not an index kind; use one of {', '.join(INDEX_KINDS)}")
    faiss = import_faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if kind == "auto":
        kind = "flat" if n < AUTO_IVF_ITEMS else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        cells = nlist or max(1, int(math.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors)
        index.nprobe = min(nprobe, cells)
    index.add(vectors)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, item rows) per query [q, d]; rows are -1 where the index found fewer than k."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """The share of the exact top-k that the approximate top-k holds, averaged over queries."""
    k = exact.shape[1]
    return float(np.mean([len(set(f[:k]) & set(e)) / k for f, e in zip(found, exact)]))
