"""Online metrics per served version, from the events: of what each version showed a user, what did the user then
act on? The A/B comparison that counts in production (offline NDCG only predicts it).

Two general hooks feed it (tasks/base.Predictor): `subject(request)`, who a request is for (a user id; A/B
assignment is sticky by it too, serve/routing.py), and `shown_items(response)`, what the answer shows that user. The
server records each answer that has both. POST /v1/events then reports each newly stored event here: an event for an
item that a version showed that user at most `window_s` before the event's time counts as a hit for that version.

    modelworks_online_answers_total{model,version}       answers that showed items to a known user
    modelworks_online_answers_hit_total{model,version}   of those, answers with at least one hit
    modelworks_online_item_hits_total{model,version}     events for a shown item (each shown item counts once)
    modelworks_online_hit_rate{model,version}            answers_hit / answers

Counting rules: an item shown by several answers of one model credits the newest (the list the user acted on),
and once acted on it counts in none of that user's earlier answers (a repeat view is not a second hit); answers
of different models are credited each. Retried events (duplicates) count nothing: only events stored
now are reported. An event's time is its `ts` (default: arrival), so a back-filled old event is no hit.

The record is memory only, bounded (the latest MAX_ANSWERS_PER_SUBJECT answers of the MAX_SUBJECTS most recent
users) and per replica: behind a load balancer, route a user's events to the replica that answered them (sticky
by user) or sum hits over replicas knowing that an event posted elsewhere is missed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .metrics import Metrics

MAX_SUBJECTS = 100_000  # users remembered; the least recently answered is forgotten first
MAX_ANSWERS_PER_SUBJECT = 32  # a user's answers remembered; older ones are dropped first


@dataclass
class Shown:
    at: float  # wall-clock time of the answer (seconds, as events' ts)
    model: str
    version: str
    items: set[str]
    hit: bool = field(default=False)


class OnlineMetrics:
    """What each version showed each user, and the hits the events report; see the module's docstring."""

    def __init__(self, metrics: Metrics, window_s: float):
        self.metrics = metrics
        self.window_s = window_s
        self.shown: OrderedDict[str, deque[Shown]] = OrderedDict()
        self.counts: dict[tuple[str, str], list[int]] = {}  # (model, version) -> [answers, answers hit]
        self.lock = threading.Lock()  # the event loop records and observes; tests and tools may call from threads

    def record(self, model: str, version: str, subject: str, items: list[str], at: float | None = None) -> None:
        """An answer showed `items` to `subject`."""
        if not items:
            return
        shown = Shown(time.time() if at is None else at, model, version, {str(item) for item in items})
        with self.lock:
            answers = self.shown.get(subject)
            if answers is None:
                answers = self.shown[subject] = deque(maxlen=MAX_ANSWERS_PER_SUBJECT)
                if len(self.shown) > MAX_SUBJECTS:
                    self.shown.popitem(last=False)
            else:
                self.shown.move_to_end(subject)
            answers.append(shown)
            counts = self.counts.setdefault((model, version), [0, 0])
            counts[0] += 1
        self.metrics.online_answers.labels(model, version).inc()
        self._update_rate(model, version, counts)

    def observe(self, events: list) -> int:
        """Events stored now (anything with user, item and ts); returns the hits they make."""
        hits = 0
        now = time.time()
        for event in events:
            answers = self.shown.get(str(event.user))
            if not answers:
                continue
            ts = now if event.ts is None else event.ts
            item = str(event.item)
            credited: set[str] = set()  # models credited with this event (the newest answer of each that showed it)
            with self.lock:
                for shown in reversed(answers):
                    if item not in shown.items or ts < shown.at:  # an event from before the answer: unrelated
                        continue
                    # Acted on: the item no longer counts in this model's answers, so a repeat event counts nothing.
                    shown.items.discard(item)
                    if (shown.model in credited or ts > shown.at + self.window_s
                            or (shown.model, shown.version) not in self.counts):  # the version was unloaded since
                        continue
                    credited.add(shown.model)
                    hits += 1
                    self.metrics.online_item_hits.labels(shown.model, shown.version).inc()
                    if not shown.hit:
                        shown.hit = True
                        counts = self.counts[(shown.model, shown.version)]
                        counts[1] += 1
                        self.metrics.online_answers_hit.labels(shown.model, shown.version).inc()
                        self._update_rate(shown.model, shown.version, counts)
        return hits

    def _update_rate(self, model: str, version: str, counts: list[int]) -> None:
        self.metrics.online_hit_rate.labels(model, version).set(counts[1] / counts[0] if counts[0] else 0.0)

    def forget_version(self, model: str, version: str) -> None:
        """An unloaded version's counts go with its metric series (Metrics.forget_version)."""
        with self.lock:
            self.counts.pop((model, version), None)
