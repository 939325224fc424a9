"""Dynamic batching: concurrent requests for one model version are grouped, run once, answered one by one.

The event loop parses and decodes a request and appends it to the version's queue; a worker thread of the
version's own takes batches from that queue and runs the graph. A batch is everything waiting, up to
`max_batch_size`. When fewer are waiting and more requests are on their way (being read or decoded by the event
loop), the batch waits for them until its oldest request has waited `max_wait_ms`; a lone request, or one that
has already waited behind a running batch, does not wait. The worker takes the next batch itself as soon as a
graph run ends and hands the answers to the event loop in one call per batch, so the graph keeps running while
the loop answers one batch and reads the next. The queue is bounded: when it is full a request is refused at
once (the route answers 503 with Retry-After) instead of waiting behind a backlog that would only grow.
`max_batch_size=1` is serving without batching: one graph run per request.

Predictors shape and check every item before it is queued, so a batch is valid by construction. Should a batch
fail all the same, the failure stays with the items that cause it: each item is run again alone, and only those
that fail alone are answered with the error.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .metrics import Metrics


class Overloaded(Exception):
    """The queue is full; `retry_after_s` is an estimate of when there will be room."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Draining(Exception):
    """The version is shutting down or being replaced and takes no new requests."""


class InferenceFailed(Exception):
    """The runtime raised while running a batch."""


@dataclass
class Pending:
    item: Any
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """The queue and the worker thread of one model version."""

    def __init__(self, model, max_batch_size: int, max_wait_ms: float, max_queue: int, metrics: Metrics,
                 labels: tuple[str, str], arriving: Callable[[], int] = lambda: 1):
        self.model = model  # export.runtime.InferenceModel
        self.arriving = arriving  # requests on their way to this queue: only they are worth waiting for
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.name = f"infer-{labels[0]}-{labels[1]}"
        self.queue: deque[Pending] = deque()  # appended by the event loop, taken by the worker, under `ready`
        self.ready = threading.Condition()
        self.closing = False  # no new requests (event loop)
        self.stopping = False  # the worker exits once the queue is empty (under `ready`)
        self.unfinished = 0  # accepted and not yet answered (event loop only)
        self.drained: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.seconds_per_batch = 0.01  # running estimate for Retry-After
        self.batch_metric = metrics.batch_size.labels(*labels)
        self.inference_metric = metrics.inference.labels(*labels)
        self.queue_metric = metrics.queue_depth.labels(*labels)

    async def start(self, warm_up: list[list] = ()) -> None:
        """Start the worker thread; it first runs the `warm_up` batches (not counted in the metrics), so that
        memory allocation and kernel selection happen on the thread that serves, before the first request."""
        self.loop = asyncio.get_running_loop()
        started = self.loop.create_future()
        self.thread = threading.Thread(target=self._work, args=(list(warm_up), started), name=self.name,
                                       daemon=True)
        self.thread.start()
        await started

    def enqueue(self, item) -> asyncio.Future:
        """Queue an item now (no await: the caller knows it is in this version's queue when this returns); the
        future gets its answer, or InferenceFailed. Raises Overloaded when the queue is full, Draining when closing.
        A future already done when its batch is taken (the caller's deadline passed, or it disconnected) is
        skipped."""
        if self.closing:
            raise Draining()
        if len(self.queue) >= self.max_queue:
            batches_ahead = len(self.queue) / self.max_batch_size
            raise Overloaded(max(1, math.ceil(batches_ahead * self.seconds_per_batch)))
        pending = Pending(item, self.loop.create_future())
        with self.ready:
            self.queue.append(pending)
            self.ready.notify()
        self.unfinished += 1
        return pending.future

    # ------------------------------------------------------------------------------------------ worker thread

    def _take_batch(self) -> list[Pending] | None:
        """The next batch, or None when stopping with nothing left."""
        with self.ready:
            while not self.queue:
                if self.stopping:
                    return None
                self.ready.wait()
            deadline = self.queue[0].queued_at + self.max_wait_s
            while len(self.queue) < self.max_batch_size and not self.stopping and self.arriving():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self.ready.wait(remaining)
            return [self.queue.popleft() for _ in range(min(len(self.queue), self.max_batch_size))]

    def _work(self, warm_up: list[list], started: asyncio.Future) -> None:
        try:
            for items in warm_up:
                self.model.predict(items)
        except Exception as exc:
            self.loop.call_soon_threadsafe(started.set_exception, exc)
            return
        # Set once warmed up, so a version that fails its warm-up never replaces a live one's gauge. Removed with the
        # version's other series when it is unloaded (Metrics.forget_version): the callback holds this batcher, and
        # with it the model and its runtime session.
        self.queue_metric.set_function(lambda: len(self.queue))
        self.loop.call_soon_threadsafe(started.set_result, None)
        while (batch := self._take_batch()) is not None:
            # A caller whose deadline passed or who disconnected has a done future: don't spend the model on it.
            live = [p for p in batch if not p.future.done()]
            answers: list = []
            if live:
                tic = time.perf_counter()
                answers = self._run(live)
                elapsed = time.perf_counter() - tic
                self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * elapsed
                self.inference_metric.observe(elapsed)
                self.batch_metric.observe(len(live))
            try:
                self.loop.call_soon_threadsafe(self._answer, len(batch), live, answers)
            except RuntimeError:  # the event loop is closed: nobody is left to answer
                return

    def _run(self, live: list[Pending]) -> list:
        """One answer per item: the prediction, or the InferenceFailed it alone causes."""
        try:
            return self.model.predict([p.item for p in live])
        except Exception as exc:  # a runtime failure: isolate it rather than fail every request in the batch
            if len(live) == 1:
                return [InferenceFailed(f"{type(exc).__name__}: {exc}")]
        answers = []
        for p in live:
            try:
                answers.extend(self.model.predict([p.item]))
            except Exception as exc:
                answers.append(InferenceFailed(f"{type(exc).__name__}: {exc}"))
        return answers

    # ------------------------------------------------------------------------------------------ event loop

    def _answer(self, taken: int, live: list[Pending], answers: list) -> None:
        for p, answer in zip(live, answers):
            if not p.future.done():
                if isinstance(answer, InferenceFailed):
                    p.future.set_exception(answer)
                else:
                    p.future.set_result(answer)
        self.unfinished -= taken
        if self.unfinished == 0 and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    async def drain(self) -> None:
        """Refuse new requests, answer every accepted one, then stop the worker."""
        self.closing = True
        if self.unfinished:
            self.drained = self.drained or asyncio.get_running_loop().create_future()
            await self.drained
        with self.ready:
            self.stopping = True
            self.ready.notify_all()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join)
