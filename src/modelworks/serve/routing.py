"""A/B routing: the versions of one model name, a weighted traffic split, and sticky assignment per caller.

A caller key (the X-Caller-Id header) hashes to a fixed point in [0, 1); the split maps that point to a version
through cumulative weights in a fixed version order. The same caller therefore always lands on the same
version while the split stands, and moving weight between versions moves only the callers whose point lies
in the part that changed hands. Requests without a key are assigned at random by the same weights.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field

from .batching import Batcher
from .streaming import Scheduler, streams

# A body that has received no bytes for this long is stalled, not arriving. A client's body comes in one or a few
# TCP segments, a fraction of a millisecond apart even across a network, but the time between two reads is also
# the time the event loop is busy elsewhere (tens of milliseconds under load), so the bound is generous: 50 ms.
# A stalled upload then makes batches wait (at most max_wait_ms each) for 50 ms, not for as long as it stalls.
ARRIVING_IDLE_S = 0.05


@dataclass
class Version:
    model: object  # export.runtime.InferenceModel
    batcher: Batcher
    scheduler: Scheduler | None = None  # continuous batching, for a predictor that streams
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.model.version


def caller_point(model_name: str, caller: str) -> float:
    """A caller's fixed point in [0, 1): the first 8 bytes of a hash, stable across processes and restarts."""
    digest = hashlib.blake2b(f"{model_name}\0{caller}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


class ModelRoute:
    """One model name: its loaded versions, their traffic weights, and the split history for rollback."""

    def __init__(self, name: str):
        self.name = name
        self.versions: dict[str, Version] = {}
        self.weights: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        # Requests being read or decoded, not yet queued, by id: their scope state, whose "body_at" is when their
        # body last received bytes (inf while decoding). The batchers wait only for these, and only while bytes keep
        # coming: a stalled upload must not make every batch wait out max_wait_ms.
        self.arriving: dict[int, dict] = {}

    def arriving_now(self) -> int:
        """Requests on their way to a queue: decoding, or whose body received bytes in the last ARRIVING_IDLE_S.
        Called from the batchers' worker threads; copying the dict's values is atomic under the GIL."""
        cutoff = time.perf_counter() - ARRIVING_IDLE_S
        return sum(1 for state in list(self.arriving.values()) if state["body_at"] > cutoff)

    @property
    def task(self) -> str:
        return next(iter(self.versions.values())).model.package.task

    @property
    def streams(self) -> bool:
        """Its predictor generates step by step (serve/streaming.py): /v1/completions serves it."""
        return streams(next(iter(self.versions.values())).model.predictor) if self.versions else False

    @property
    def predictor_class(self) -> type:
        return type(next(iter(self.versions.values())).model.predictor)

    def choose(self, caller: str | None) -> Version:
        active = [(name, weight) for name, weight in self.weights.items() if weight > 0]
        total = sum(weight for _, weight in active)
        point = caller_point(self.name, caller) if caller else random.random()
        target, cumulative = point * total, 0.0
        for name, weight in active:
            cumulative += weight
            if target < cumulative:
                return self.versions[name]
        return self.versions[active[-1][0]]

    def set_weights(self, weights: dict[str, float], remember: bool = True) -> None:
        """Validated by the caller. Versions keep their load order, so stickiness survives weight changes."""
        if remember:
            self.history.append(dict(self.weights))
        self.weights = {name: float(weights.get(name, 0.0)) for name in self.versions}

    def describe(self) -> dict:
        total = sum(self.weights.values()) or 1.0
        return {
            "name": self.name, "task": self.task,
            "versions": [{"version": name, "traffic": self.weights.get(name, 0.0) / total,
                          "runtime": v.model.runtime, "created": v.model.package.manifest.get("created"),
                          "source_run": v.model.package.manifest.get("source", {}).get("run_dir")}
                         for name, v in self.versions.items()],
        }
