"""Project 6: next-item recommendation (MovieLens, any user-item event CSV) with EASE, SASRec, a two-tower
retrieval model and a popularity baseline, under the leave-last-out, full-ranking protocol (data.py, metrics.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import torch
from torch import nn

from ...errors import DataError
from ..base import Splits, StepOutput, Task
from . import data as rec_data
from .metrics import RankingMetrics, mask_seen, target_ranks
from .models import EASE, SASRec, MostPopular, multi_hot
from .predictor import RecommendationPredictor, RecommendationRequest
from .retrieval import INDEX_KINDS
from .two_tower import TwoTower, UserTower
from .two_tower_predictor import TwoTowerPredictor

CLOSED_FORM = ("ease", "most-popular")


@dataclass
class RecommendationModelConfig:
    name: Literal["ease", "sasrec", "two-tower", "most-popular"] = "sasrec"
    max_len: int = 200  # history items the model reads (the most recent); the exported graph's input length
    # Training samples per user: "last" = the most recent max_len + 1 items only; "all" = windows of max_len + 1
    # cut back from the end over the whole history, so every training transition is a target once (long
    # histories, as ml-latest-small's median of 70, are otherwise mostly unseen by training).
    train_windows: Literal["last", "all"] = "last"
    l2: float = 100.0  # EASE's lambda (Steck 2019 uses 500 on ML-20M; 100 is best on ml-100k's validation split)
    dim: int = 64  # SASRec and two-tower: embedding width
    layers: int = 2  # SASRec: transformer blocks
    heads: int = 2  # SASRec: attention heads
    # SASRec: 0 = full-softmax cross-entropy over every item; k > 0 = a sampled softmax over k uniformly drawn
    # items per step (models.sampled_cross_entropy), for catalogues where the full one dominates a step
    negatives: int = 0
    dropout: float = 0.2  # SASRec: on embeddings, attention and block outputs; two-tower: on history embeddings
    temperature: float = 0.05  # two-tower: cosine scores are divided by it (unit vectors need a sharp softmax)
    index: str = "auto"  # two-tower serving: the faiss index over item vectors (retrieval.py: auto|flat|ivf|hnsw)

    def __post_init__(self):
        if self.max_len < 1:
            raise ValueError(f"model.max_len: must be >= 1 (got {self.max_len})")
        if self.dim % self.heads:
            raise ValueError(f"model.dim: must be divisible by model.heads={self.heads} (got {self.dim})")
        if self.negatives < 0:
            raise ValueError(f"model.negatives: must be >= 0 (0: the full softmax; got {self.negatives})")
        if self.l2 < 0:
            raise ValueError(f"model.l2: must be >= 0 (got {self.l2})")
        if not self.temperature > 0:
            raise ValueError(f"model.temperature: must be > 0 (got {self.temperature})")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"model.index: {self.index!r} is not an index kind; use one of {', '.join(INDEX_KINDS)}")


@dataclass
class RecommendationDataConfig:
    source: str = "movielens:data/ml-100k"  # movielens:FOLDER | interactions:FILE.csv
    user_column: str = "user"  # interactions only: the CSV's column names
    item_column: str = "item"
    timestamp_column: str = "timestamp"
    min_interactions: int = 3  # users with fewer only train: leave-last-out needs two held-out items
    # More interactions appended to the source: a CSV with the header user,item,timestamp, as `modelworks retrain`
    # exports the event store's events. Empty: none.
    events: str = ""

    def __post_init__(self):
        kind, sep, path = self.source.partition(":")
        if kind not in ("movielens", "interactions") or not sep or not path:
            raise ValueError(f"data.source: {self.source!r} is not a data source; use movielens:FOLDER (ml-100k, "
                             "ml-1m, ml-latest-small, ml-25m) or interactions:FILE.csv")
        if self.min_interactions < 3:
            raise ValueError(f"data.min_interactions: must be >= 3 (got {self.min_interactions}): a user needs a "
                             "validation and a test item besides what trains")


class RecommendationTask(Task):
    name = "recommendation"
    monitor = ("val/ndcg@10", "max")
    ModelConfig = RecommendationModelConfig
    DataConfig = RecommendationDataConfig
    int8_method = "dynamic"  # SASRec's matrix products; static int8 measured slower than fp32 ONNX here

    def __init__(self, cfg):
        super().__init__(cfg)
        self.split: rec_data.LeaveLastOut | None = None
        self.catalogue: dict | None = None  # ids, titles, genres, popularity: learned from the data or a package
        self.n_genres = 0  # two-tower: the genre vocabulary's size, from a package's spec (its table is in the weights)
        self.item_vectors: np.ndarray | None = None  # two-tower: the exported model's, for its predictor

    # ------------------------------------------------------------------------------------------ data

    def load_interactions(self) -> rec_data.Interactions:
        data = self.cfg.data
        kind, _, path = data.source.partition(":")
        if kind == "movielens":
            interactions = rec_data.read_movielens(Path(path))
        elif not Path(path).is_file():
            raise DataError(f"data.source: {path} is not a file; interactions:FILE.csv names a CSV of events")
        else:
            interactions = rec_data.read_csv_events(Path(path), data.user_column, data.item_column,
                                                    data.timestamp_column)
        if data.events:
            # Appended: the split orders each user's interactions by time, so the events land where they happened.
            extra = rec_data.read_csv_events(Path(data.events), "user", "item", "timestamp")
            interactions.users += extra.users
            interactions.items += extra.items
            interactions.timestamps += extra.timestamps
        return interactions

    def retrain_overrides(self, events_file: Path) -> list[str]:
        # The recorded source stays when it is still readable (titles and genres come from it); otherwise the
        # events alone train, and items new to the catalogue have no titles.
        _, _, path = self.cfg.data.source.partition(":")
        if Path(path).exists():
            return [f"data.events={events_file}"]
        return [f"data.source=interactions:{events_file}", "data.user_column=user", "data.item_column=item",
                "data.timestamp_column=timestamp", "data.events="]

    def load_split(self) -> tuple[rec_data.Interactions, rec_data.LeaveLastOut]:
        """Read the data and split it; the task learns the item catalogue from it."""
        interactions = self.load_interactions()
        split = rec_data.leave_last_out(interactions, self.cfg.data.min_interactions)
        self.split = split
        self.catalogue = {"ids": split.item_ids,
                          "titles": {i: interactions.titles[i] for i in split.item_ids if i in interactions.titles},
                          "genres": {i: interactions.genres[i] for i in split.item_ids if i in interactions.genres},
                          "popularity": split.popularity[1:].tolist()}
        return interactions, split

    def datasets(self, device: torch.device) -> Splits:
        interactions, split = self.load_split()
        max_len = self.cfg.model.max_len
        val, test = rec_data.evaluation_splits(split, max_len)
        train = rec_data.NextItemSequences(split.train, max_len, every_window=self.cfg.model.train_windows == "all")
        if not len(val) or not len(train):
            raise DataError(f"{interactions.source}: no user has {self.cfg.data.min_interactions} or more "
                            "interactions; leave-last-out has nothing to hold out")
        held_out = sum(1 for v in split.val if v)
        notes = [f"data: {len(interactions.users)} interactions, {len(split.user_ids)} users, {split.n_items} items; "
                 f"leave-last-out by time: {held_out} users hold out a validation and a test item "
                 f"({len(split.user_ids) - held_out} with fewer than {self.cfg.data.min_interactions} only train)"]
        longest = max(len(h) for h in split.train)
        if longest > max_len and self.cfg.model.train_windows == "last":
            notes.append(f"model.max_len={max_len}: the model reads the most recent {max_len} items of a history "
                         f"(the longest has {longest}); seen items are masked from the whole history")
        return Splits(train.to(device), val.to(device), test.to(device), notes=notes)

    @property
    def n_items(self) -> int:
        if self.catalogue is None:  # the model is built before the splits (or from a package: adopt_spec)
            self.load_split()
        return len(self.catalogue["ids"])

    # ------------------------------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        if m.name == "ease":
            return EASE(self.n_items)
        if m.name == "most-popular":
            return MostPopular(self.n_items)
        if m.name == "two-tower":
            popularity = torch.tensor(self.catalogue["popularity"], dtype=torch.float64)
            return TwoTower(self.n_items, self.genre_matrix(), popularity, m.dim, m.dropout, m.temperature)
        return SASRec(self.n_items, m.max_len, m.dim, m.layers, m.heads, m.dropout, m.negatives)

    def genre_matrix(self) -> torch.Tensor:
        """[n, G] multi-hot genres of each item (G >= 1: a catalogue without genres gets one empty column)."""
        genres = self.catalogue.get("genres", {})
        names = sorted({g for item in genres.values() for g in item})
        matrix = torch.zeros(self.n_items, max(1, len(names), self.n_genres))
        column = {g: j for j, g in enumerate(names)}
        for row, item in enumerate(self.catalogue["ids"]):
            for g in genres.get(item, []):
                matrix[row, column[g]] = 1.0
        return matrix

    def trains_in_closed_form(self) -> bool:
        return self.cfg.model.name in CLOSED_FORM

    def fit_closed_form(self, model: nn.Module, splits: Splits) -> dict[str, float]:
        """The user-item matrix of the training split (no validation or test item in it) -> the solution."""
        rows = [torch.tensor(sequence or [0]) for sequence in self.split.train]
        histories = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        device = next(iter(model.state_dict().values())).device
        x = multi_hot(histories.to(device), self.n_items)
        model.fit(x, self.cfg.model.l2)
        return {"users": float(x.shape[0]), "interactions": float(x.sum())}

    def step(self, model: nn.Module, batch) -> StepOutput:
        inputs, targets = batch
        # Through forward (not a method of the model) so a DDP wrapper sees the call and syncs gradients.
        return StepOutput(model(inputs, targets), {}, len(inputs))

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, batches: Iterable, report_dir: Path | None = None) -> dict[str, float]:
        popularity = torch.tensor(self.catalogue["popularity"], dtype=torch.float64)
        metrics = RankingMetrics(popularity, len(self.split.user_ids) if self.split else 1)
        for history, target, seen in batches:
            metrics.update(model(history).float(), target, seen)
        return metrics.compute()

    # ------------------------------------------------------------------------------------------ export

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        max_len = self.cfg.model.max_len
        history = torch.zeros(2, max_len, dtype=torch.long)
        n = min(self.n_items, max_len)
        history[0, -n:] = torch.arange(1, n + 1)
        history[1, -1] = 1  # a one-item history: mostly padding
        return (history,)

    def export_module(self, model: nn.Module) -> nn.Module:
        if isinstance(model, TwoTower):  # the item vectors go to the predictor's faiss index, not the graph
            self.item_vectors = model.item_vectors().detach().cpu().float().numpy()
            return UserTower(model)
        return model

    def export_graphs(self, model: nn.Module):
        self.export_module(model)  # a two-tower predictor (built first by the default) needs the item vectors
        return super().export_graphs(model)

    predictor_class = RecommendationPredictor

    def predictor(self) -> RecommendationPredictor:
        m = self.cfg.model
        if m.name == "two-tower":
            if self.item_vectors is None:
                raise RuntimeError("two-tower: the predictor needs the model's item vectors; call "
                                   "export_graphs(model) (or export_module) first")
            genres = self.genre_matrix().shape[1]
            spec = {**TwoTowerPredictor.build_spec(self.n_items, m.max_len, m.name, m.temperature, m.index),
                    "n_genres": genres}
            return TwoTowerPredictor(spec, self.catalogue, self.item_vectors)
        spec = RecommendationPredictor.build_spec(self.n_items, m.max_len, m.name)
        return RecommendationPredictor(spec, self.catalogue)

    @classmethod
    def evaluate_on_events(cls, model, events: list[tuple[str, str, float]]) -> dict[str, float]:
        """Leave-last-out on the events: each user's newest event is the target, the events before it the history
        (as the server reads it), seen items masked, full ranking; HR@10 and NDCG@10 as in training."""
        predictor: RecommendationPredictor = model.predictor
        histories: dict[str, list[str]] = {}
        for user, item, _ in events:
            histories.setdefault(user, []).append(item)
        items, targets = [], []
        for user, sequence in histories.items():
            if len(sequence) < 2:
                continue
            history = [i for i in sequence[:-1] if i in predictor.index][-predictor.max_len:]
            request = RecommendationRequest(user=user, history=history, k=min(10, len(predictor.ids)))
            items.append(predictor.parse(request))
            targets.append(sequence[-1])
        hits, gains = 0.0, 0.0
        for start in range(0, len(items), 256):
            answers = model.predict(items[start:start + 256])
            for answer, target in zip(answers, targets[start:start + 256]):
                ranked = [entry.item for entry in answer.items]
                if target in ranked:  # a target the model does not know is a miss
                    hits += 1
                    gains += 1 / math.log2(ranked.index(target) + 2)
        n = max(len(targets), 1)
        return {"hr@10": hits / n, "ndcg@10": gains / n, "users": float(len(targets))}

    @classmethod
    def load_predictor(cls, spec: dict, folder: Path | None = None) -> RecommendationPredictor:
        if spec.get("model") == "two-tower":
            return TwoTowerPredictor.from_folder(spec, folder)
        return RecommendationPredictor.from_folder(spec, folder)

    def adopt_spec(self, spec: dict) -> None:
        # The eager runtime needs only the item count (and the genre table's width); the ids stay with the
        # predictor, and the genre table and popularity come back with the weights.
        self.catalogue = {"ids": [str(i) for i in range(1, int(spec["n_items"]) + 1)],
                          "popularity": [0] * int(spec["n_items"])}
        self.n_genres = int(spec.get("n_genres", 0))

    def graph_inputs(self, batch) -> tuple[torch.Tensor, ...]:
        return (batch[0],)

    def score_outputs(self, outputs, reference, batch) -> dict[str, torch.Tensor]:
        _, target, seen = batch
        scores, eager = outputs[0], reference[0]
        if self.cfg.model.name == "two-tower":  # the graph gives user vectors: score them as the predictor does
            vectors = torch.from_numpy(self.item_vectors).to(scores.dtype)
            scores, eager = scores @ vectors.T, eager @ vectors.T
        scores, eager = mask_seen(scores, seen), mask_seen(eager, seen)
        # Agreement: the format's top item is one eager PyTorch ranks first too (ties within float noise count).
        top = scores.argmax(1, keepdim=True)
        agreement = (eager.gather(1, top).squeeze(1) >= eager.max(1).values - 1e-5).float()
        rank = target_ranks(scores, target)
        return {"agreement": agreement, "hr@10": (rank < 10).float()}

    @classmethod
    def tiny(cls, folder: Path) -> dict:
        """Seconds-scale SASRec on a small ml-100k-format set written into `folder`."""
        rec_data.write_ml100k(folder, n_users=48, n_items=30, seed=0)
        return {"data": {"source": f"movielens:{folder}"},
                "model": {"name": "sasrec", "max_len": 12, "dim": 16, "layers": 1, "heads": 2, "dropout": 0.0},
                "optim": {"lr": 0.01},
                "train": {"epochs": 3, "batch_size": 32, "eval_batch_size": 64, "log_every_steps": 1}}

