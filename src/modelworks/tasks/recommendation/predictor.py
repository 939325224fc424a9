"""Serving-side recommendation: a user's recent items (raw ids) -> the top-k unseen items with titles and scores.

The graph scores every item from a fixed-length, left-padded history (the most recent `max_len` items); the
user's history and the request's `exclude` list are removed here, after the graph, so the exported graph stays
one matrix product or one transformer pass. A user with no history (cold start) gets the most popular training
items, and the answer says so (`fallback: "popularity"`). The item catalogue (ids, titles, genres, popularity)
ships beside the manifest as items.json, checksummed with the package's other files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...errors import InputError, PackageError
from ..base import Predictor

CATALOGUE_FILE = "items.json"
MAX_K = 100  # the longest list one request may ask for


class RecommendationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str | int | None = Field(None, description="The user's id, echoed in the answer.")
    history: list[str | int] = Field(default_factory=list, description="The user's items, oldest first (raw item "
                                     "ids as in the training data). Empty: a cold user, answered by popularity.")
    k: int = Field(10, ge=1, description=f"How many items to return (at most {MAX_K} and the catalogue's size).")
    exclude: list[str | int] = Field(default_factory=list, description="Items never to recommend (besides the "
                                                                       "history, unless exclude_history is false).")
    exclude_history: bool = Field(True, description="Never recommend an item of the history (what the user saw).")


class RecommendQuery(BaseModel):
    """GET /v1/models/NAME/recommend?user=42&k=10&exclude=seen,50: the user's history comes from the server's
    event store (`modelworks serve --events`), read at request time."""
    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1, description="The user's id, as in the events.")
    k: int = Field(10, ge=1, le=MAX_K, description=f"How many items to return (at most {MAX_K}).")
    exclude: str = Field("", description='Comma-separated: "seen" (the items of the user\'s history) and/or item '
                                         "ids never to recommend.")


class RecommendedItem(BaseModel):
    item: str
    title: str
    genres: list[str]
    score: float


class RecommendationResponse(BaseModel):
    user: str | None
    items: list[RecommendedItem]
    fallback: str | None = Field(None, description='"popularity" when the history was empty (a cold user).')
    history_used: int = Field(description="How many history items the model read (the most recent, up to its "
                                          "input length).")


class RecommendationPredictor(Predictor):
    Request = RecommendationRequest
    Response = RecommendationResponse
    query_routes = {"recommend": RecommendQuery}

    def __init__(self, spec: dict, catalogue: dict):
        super().__init__(spec)
        self.catalogue = catalogue
        self.ids: list[str] = list(catalogue["ids"])
        self.index = {raw: i + 1 for i, raw in enumerate(self.ids)}
        self.max_len = int(spec["max_len"])
        self.history_length = self.max_len  # live serving reads the user's latest max_len events
        popularity = np.asarray(catalogue["popularity"], dtype=np.float64)
        self.by_popularity = np.argsort(-popularity, kind="stable")  # 0-based item columns, most popular first
        self.popularity = popularity
        titles, genres = catalogue.get("titles", {}), catalogue.get("genres", {})
        # Per item column, what an answer shows of it besides the score.
        self.shown = [{"item": raw, "title": titles.get(raw, ""), "genres": genres.get(raw, [])} for raw in self.ids]

    @staticmethod
    def build_spec(n_items: int, max_len: int, model: str) -> dict:
        return {"inputs": [{"name": "history", "shape": ["batch", max_len], "dtype": "int64"}],
                "outputs": ["scores"], "n_items": n_items, "max_len": max_len, "model": model,
                "catalogue": CATALOGUE_FILE, "max_k": MAX_K}

    @classmethod
    def from_folder(cls, spec: dict, folder: Path | None) -> RecommendationPredictor:
        if folder is None:
            raise PackageError(f"recommendation: the predictor needs its item catalogue {CATALOGUE_FILE}; open the "
                               "package folder, not its manifest alone")
        path = Path(folder) / spec.get("catalogue", CATALOGUE_FILE)
        try:
            catalogue = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PackageError(f"{path}: the item catalogue cannot be read ({exc}); export the model again") from None
        if len(catalogue.get("ids", [])) != spec["n_items"]:
            raise PackageError(f"{path}: {len(catalogue.get('ids', []))} items, but the model scores "
                               f"{spec['n_items']}; the file does not belong to this package")
        return cls(spec, catalogue)

    def files(self) -> dict[str, bytes]:
        return {CATALOGUE_FILE: json.dumps(self.catalogue, ensure_ascii=False).encode()}

    # ------------------------------------------------------------------------------------------ live history

    def history_user(self, request: RecommendationRequest) -> str | None:
        return None if request.history or request.user is None else str(request.user)

    def with_history(self, request: RecommendationRequest, items: list[str]) -> RecommendationRequest:
        # Events name items of the catalogue they were checked against; a new version's catalogue may lack some.
        return request.model_copy(update={"history": [i for i in items if i in self.index]})

    def unknown_items(self, items: list[str]) -> list[str]:
        return [item for item in items if item not in self.index]

    def subject(self, request: RecommendationRequest) -> str | None:
        return None if request.user is None else str(request.user)

    def shown_items(self, response: RecommendationResponse) -> list[str]:
        return [item.item for item in response.items]

    def request_from_query(self, route: str, query: RecommendQuery) -> RecommendationRequest:
        wanted = [part.strip() for part in query.exclude.split(",") if part.strip()]
        return RecommendationRequest(user=query.user, k=query.k, exclude=[i for i in wanted if i != "seen"],
                                     exclude_history="seen" in wanted)

    # ------------------------------------------------------------------------------------------ requests

    def example_request(self) -> tuple[RecommendationRequest, None]:
        return RecommendationRequest(user="example", history=self.ids[:3], k=min(10, len(self.ids))), None

    def _indices(self, items: list, field: str) -> list[int]:
        # One lookup per item (this runs on the server's event loop for every live request).
        found = [self.index.get(str(i)) for i in items]
        if None not in found:
            return found
        unknown = [str(i) for i, index in zip(items, found) if index is None]
        if unknown:
            shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            raise InputError(f"{field}: {len(unknown)} item{'s' if len(unknown) > 1 else ''} not in the model's "
                             f"catalogue: {shown}; send item ids as in the training data (the package's "
                             f"{CATALOGUE_FILE} lists them)", field)
        return [self.index[str(i)] for i in items]

    def parse(self, request: RecommendationRequest, file: bytes | None = None) -> dict:
        limit = min(MAX_K, len(self.ids))
        if request.k > limit:
            raise InputError(f"k: at most {limit} (the catalogue has {len(self.ids)} items; one request returns at "
                             f"most {MAX_K}) (got {request.k})", "k")
        history = self._indices(request.history, "history")
        exclude = self._indices(request.exclude, "exclude")
        used = history[-self.max_len:]
        padded = np.zeros(self.max_len, np.int64)
        if used:
            padded[-len(used):] = used
        return {"user": None if request.user is None else str(request.user), "history": padded,
                "used": len(used), "hide": sorted(set(history if request.exclude_history else ()) | set(exclude)),
                "k": request.k}

    def parse_inline(self, request: RecommendationRequest, file: bytes | None = None) -> dict:
        # A few dict lookups and one small array: cheaper on the event loop than a hand-off to the decode pool.
        return self.parse(request, file)

    # ------------------------------------------------------------------------------------------ batches

    def collate(self, items: list[dict]) -> dict[str, np.ndarray]:
        return {"history": np.stack([item["history"] for item in items])}

    def predict(self, items: list[dict], run) -> list[RecommendationResponse]:
        warm = [i for i, item in enumerate(items) if item["used"]]
        ranked = {}
        if warm:  # a batch of cold users needs no graph call
            (outputs,) = run(self.collate([items[i] for i in warm]))[:1]
            ranked = dict(zip(warm, self._rank([items[i] for i in warm], outputs)))
        return [self._answer(item, *(ranked[i] if i in ranked else self._popular(item)))
                for i, item in enumerate(items)]

    def postprocess(self, outputs: Sequence[np.ndarray], items: list) -> list[RecommendationResponse]:
        return [self._answer(item, *ranked) for item, ranked in zip(items, self._rank(items, outputs[0]))]

    def _rank(self, items: list[dict], outputs) -> list[tuple[np.ndarray, np.ndarray, None]]:
        """Each warm item's (item columns, scores, None) from the graph's output rows: here scores over every item."""
        return self._top_k(items, outputs)

    def _top_k(self, items: list[dict], scores) -> list[tuple[np.ndarray, np.ndarray, None]]:
        """(item columns, scores, None) of each row's top k, hidden items masked: one masking and one partial sort for
        the whole batch (this runs in the inference thread, holding the GIL, for every request)."""
        scores = np.array(scores, dtype=np.float64)  # a copy: the runtime's buffer is not ours to mask
        rows = np.repeat(np.arange(len(items)), [len(item["hide"]) for item in items])
        if len(rows):
            scores[rows, np.concatenate([item["hide"] for item in items]).astype(np.int64) - 1] = -np.inf
        k = min(max(item["k"] for item in items), scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top, top_scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)
        ranked = []
        for item, columns, values in zip(items, top, top_scores):
            keep = min(item["k"], int(np.isfinite(values).sum()))  # fewer when all but a few items are hidden
            ranked.append((columns[:keep], values[:keep], None))
        return ranked

    def _popular(self, item: dict) -> tuple[np.ndarray, np.ndarray, str]:
        hide = np.asarray(item["hide"], dtype=np.int64) - 1
        order = self.by_popularity[~np.isin(self.by_popularity, hide)][:item["k"]]
        return order, self.popularity[order], "popularity"

    def _answer(self, item: dict, order: np.ndarray, values: np.ndarray, fallback: str | None
                ) -> RecommendationResponse:
        # One validation of the whole answer (in pydantic's core) rather than one model per item.
        shown = self.shown
        return RecommendationResponse.model_validate({
            "user": item["user"], "fallback": fallback, "history_used": item["used"],
            "items": [{**shown[j], "score": v} for j, v in zip(order.tolist(), values.tolist())]})
