"""Prometheus metrics of one app, on a registry of its own (several apps in one process stay separate)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Request latency in seconds: fine steps where a small CPU model answers (1-50 ms), coarse up to the timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Time to first token: a prefill of a queued sequence, from a few ms to the timeout.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LABELS = ("model", "version")


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("modelworks_requests", "Prediction requests by model, version and HTTP status",
                                [*LABELS, "status"], registry=r)
        self.errors = Counter("modelworks_errors", "Failed prediction requests by model, version and kind "
                              "(invalid_input, overloaded, timeout, ...)", [*LABELS, "kind"], registry=r)
        self.latency = Histogram("modelworks_request_seconds", "Prediction request latency, arrival to answer",
                                 LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("modelworks_batch_size", "Requests per graph run (dynamic batching)", LABELS,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("modelworks_inference_seconds", "Time to run one batch through the model",
                                   LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("modelworks_queue_depth", "Requests waiting for a batch", LABELS, registry=r)
        self.confidence = Histogram("modelworks_prediction_confidence", "The predictor's confidence per answer "
                                    "(classification: top-1 probability); a shift means the inputs drifted",
                                    LABELS, buckets=CONFIDENCE_BUCKETS, registry=r)
        # Streaming predictors only (serve/streaming.py): observed per sequence, not per request.
        self.time_to_first_token = Histogram("modelworks_time_to_first_token_seconds", "Time from a sequence's "
                                             "queueing to its first generated token", LABELS, buckets=TTFT_BUCKETS,
                                             registry=r)
        self.generated_tokens = Counter("modelworks_generated_tokens", "Tokens generated; rate() is tokens/s",
                                        LABELS, registry=r)
        self.running_sequences = Gauge("modelworks_running_sequences", "Sequences in the running decode batch "
                                       "(continuous batching)", LABELS, registry=r)
        self.waiting_sequences = Gauge("modelworks_waiting_sequences", "Sequences queued to join the running "
                                       "batch", LABELS, registry=r)
        self.traffic_weight = Gauge("modelworks_traffic_weight", "Share of traffic routed to each version (A/B)",
                                    LABELS, registry=r)
        self.events = Counter("modelworks_events", "Events posted to /v1/events, by outcome: stored, or duplicate "
                              "(an event_id stored before: acknowledged, not stored again)", ["outcome"], registry=r)
        # A/B online metrics from the events (serve/online.py): what each version showed a user, and what followed.
        self.online_answers = Counter("modelworks_online_answers", "Answers that showed items to a known user "
                                      "(Predictor.subject and shown_items)", LABELS, registry=r)
        self.online_answers_hit = Counter("modelworks_online_answers_hit", "Answers followed, within the hit window, "
                                          "by an event of that user for one of the items shown", LABELS, registry=r)
        self.online_item_hits = Counter("modelworks_online_item_hits", "Events for an item a version showed that "
                                        "user within the hit window (each shown item counts once)", LABELS,
                                        registry=r)
        self.online_hit_rate = Gauge("modelworks_online_hit_rate", "online_answers_hit / online_answers: the share "
                                     "of answers the user acted on, per version (A/B)", LABELS, registry=r)
        # Unlabelled: one value per server. An alert reads readiness here rather than probing /readyz, and the
        # queue's bound here to turn modelworks_queue_depth into a saturation ratio.
        self.ready = Gauge("modelworks_ready", "1 while /readyz answers 200 (every model has a loaded, warmed-up "
                           "version with traffic); 0 while starting or draining", registry=r)
        self.queue_capacity = Gauge("modelworks_queue_capacity", "Requests one version's queue holds before it "
                                    "answers 503 overloaded (max_queue)", registry=r)
        self._request_series: dict[tuple[str, str, int], tuple] = {}  # request_series' cache

    def request_series(self, model: str, version: str, status: int):
        """(requests counter, latency histogram) of one model, version and status: looked up once, then kept (a
        labels() call validates and locks; every request records these two)."""
        key = (model, version, status)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = (self.requests.labels(model, version, str(status)),
                                                  self.latency.labels(model, version))
        return series

    def forget_version(self, model: str, version: str) -> None:
        """Remove every series of an unloaded version. The queue-depth gauge's callback holds the version's batcher
        (and through it the model and its runtime session): left registered, each unload leaked a model."""
        self._request_series = {key: series for key, series in self._request_series.items()
                                if key[:2] != (model, version)}
        for metric in (self.requests, self.errors, self.latency, self.batch_size, self.inference, self.queue_depth,
                       self.confidence, self.traffic_weight, self.time_to_first_token, self.generated_tokens,
                       self.running_sequences, self.waiting_sequences, self.online_answers, self.online_answers_hit,
                       self.online_item_hits, self.online_hit_rate):
            # prometheus_client keeps a metric's children keyed by their label values and offers no public way to
            # list them; `_metrics` (under `_lock`) has been that dict since the labels API began.
            with metric._lock:
                keys = [key for key in metric._metrics if key[:2] == (model, version)]
            for key in keys:
                metric.remove(*key)

    def render(self) -> bytes:
        return generate_latest(self.registry)
