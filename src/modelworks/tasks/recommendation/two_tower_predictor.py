"""Serving a two-tower model: the graph turns the history into a user vector, a faiss index over the item vectors
(item_vectors.npy in the package, built into an index at load) fetches candidates, and the candidates are
re-scored exactly (float64 dot products with the stored vectors) before the top-k. Requests and answers are the
same as every recommender's (predictor.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ...errors import PackageError
from .predictor import RecommendationPredictor
from .retrieval import build_index, search

VECTORS_FILE = "item_vectors.npy"
MIN_CANDIDATES = 100  # fetched per request at least, re-scored exactly; more when the history to hide is longer


class TwoTowerPredictor(RecommendationPredictor):
    def __init__(self, spec: dict, catalogue: dict, item_vectors: np.ndarray):
        super().__init__(spec, catalogue)
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        self.temperature = float(spec["temperature"])
        self.ann_index = build_index(self.item_vectors, spec.get("index", "auto"))

    @staticmethod
    def build_spec(n_items: int, max_len: int, model: str, temperature: float = 1.0, index: str = "auto") -> dict:
        spec = RecommendationPredictor.build_spec(n_items, max_len, model)
        return {**spec, "outputs": ["user_vector"], "item_vectors": VECTORS_FILE, "temperature": temperature,
                "index": index}

    @classmethod
    def from_folder(cls, spec: dict, folder: Path | None) -> TwoTowerPredictor:
        base = RecommendationPredictor.from_folder(spec, folder)
        path = Path(folder) / spec.get("item_vectors", VECTORS_FILE)
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise PackageError(f"{path}: the item vectors cannot be read ({exc}); export the model again") from None
        if vectors.ndim != 2 or vectors.shape[0] != spec["n_items"]:
            raise PackageError(f"{path}: shape {vectors.shape}, but the model scores {spec['n_items']} items; the "
                               "file does not belong to this package")
        return cls(spec, base.catalogue, vectors)

    def files(self) -> dict[str, bytes]:
        buffer = io.BytesIO()
        np.save(buffer, self.item_vectors, allow_pickle=False)
        return {**super().files(), VECTORS_FILE: buffer.getvalue()}

    def _rank(self, items: list[dict], user_vectors) -> list:
        """The graph gives user vectors: each row's candidates from the index, scored exactly, then the top k."""
        users = np.asarray(user_vectors, dtype=np.float32)
        return self._top_k(items, np.stack([self.candidate_scores(u, item) for item, u in zip(items, users)]))

    def candidate_scores(self, user: np.ndarray, item: dict) -> np.ndarray:
        """A row over every item: the exact score of each retrieved candidate, -inf elsewhere (so the base
        predictor's masking and top-k apply unchanged)."""
        wanted = min(len(self.ids), max(MIN_CANDIDATES, item["k"] + len(item["hide"])))
        _, rows = search(self.ann_index, user[None], wanted)
        rows = rows[0][rows[0] >= 0]
        row = np.full(len(self.ids), -np.inf)
        row[rows] = self.item_vectors[rows].astype(np.float64) @ user.astype(np.float64) / self.temperature
        return row
