"""Continuous batching for predictors that generate step by step, and the hook the server looks for.

A predictor streams when it offers the step-wise API (checked by `streams`, never by task name):

    sequence = predictor.start(item)               # no graph call; `sequence.finished` turns True at the end
    deltas = predictor.step(sequences, run)        # one step for each sequence: a Delta(text, token, finished,
                                                   # finish_reason) each, in order; new ones are prefilled
    response = predictor.respond(sequence)         # the Response (text, finish_reason, prompt_tokens,
                                                   # completion_tokens) once finished

A `Scheduler` per model version runs that loop on a worker thread of its own (the graph calls stay off the event
loop, as the Batcher's do). At every step, waiting sequences join the running batch up to `max_running` (their
prefill runs in that step), finished ones leave, and cancelled ones (a client that disconnected, a deadline that
passed) are dropped: nobody waits for the longest generation in a batch, and a freed slot is taken at the next
step. The waiting queue is bounded (`max_queue` sequences; a request that would overflow it is refused whole,
answered 503). Each step's deltas reach the event loop in one call, and each stream's events queue there.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .batching import Draining, InferenceFailed, Overloaded
from .metrics import Metrics


def streams(predictor) -> bool:
    """Whether the predictor offers the step-wise generation API above."""
    return all(callable(getattr(predictor, name, None)) for name in ("start", "step", "respond"))


@dataclass
class Stream:
    """One sequence's handle: the worker fills `events` (on the event loop) with its deltas, then None at the end,
    or an InferenceFailed. `index` is its place among its request's choices."""

    sequence: Any
    events: asyncio.Queue
    index: int = 0
    cancelled: bool = False  # set on the event loop, read by the worker at its next step
    queued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


class Scheduler:
    """The waiting queue, the running batch and the worker thread of one streaming model version."""

    def __init__(self, model, max_running: int, max_queue: int, metrics: Metrics, labels: tuple[str, str]):
        self.model = model  # export.runtime.InferenceModel
        self.predictor = model.predictor
        self.max_running = max_running
        self.max_queue = max_queue
        self.name = f"stream-{labels[0]}-{labels[1]}"
        self.waiting: deque[Stream] = deque()  # appended by the event loop, taken by the worker, under `ready`
        self.running: list[Stream] = []  # the worker's only
        self.ready = threading.Condition()
        self.closing = False  # no new requests (event loop)
        self.stopping = False  # the worker exits once nothing waits or runs (under `ready`)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.seconds_per_step = 0.01  # running estimate, for Retry-After
        self.idle: asyncio.Event | None = None  # set while nothing waits or runs (for drain)
        self.labels = labels
        self.metrics = metrics
        self.ttft = metrics.time_to_first_token.labels(*labels)
        self.tokens = metrics.generated_tokens.labels(*labels)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle = asyncio.Event()
        self.idle.set()
        self.metrics.running_sequences.labels(*self.labels).set_function(lambda: len(self.running))
        self.metrics.waiting_sequences.labels(*self.labels).set_function(lambda: len(self.waiting))
        self.thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self.thread.start()

    def submit(self, items: list) -> list[Stream]:
        """Queue one request's sequences, all or none (no await: on return they are queued). Raises Overloaded
        when they would overflow the waiting queue, Draining when the version is closing."""
        if self.closing:
            raise Draining()
        if len(self.waiting) + len(items) > self.max_queue:
            steps_ahead = len(self.waiting) / self.max_running
            raise Overloaded(max(1, math.ceil(steps_ahead * self.seconds_per_step)))
        events: asyncio.Queue = asyncio.Queue()
        created = [Stream(self.predictor.start(item), events, index) for index, item in enumerate(items)]
        self.idle.clear()
        with self.ready:
            self.waiting.extend(created)
            self.ready.notify()
        return created

    @staticmethod
    def cancel(created: list[Stream]) -> None:
        """The caller left (disconnected, or its deadline passed): the worker drops these at its next step."""
        for stream in created:
            stream.cancelled = True

    # ------------------------------------------------------------------------------------------ worker thread

    def _admit(self) -> bool:
        """Move waiting sequences into the running batch while there is room; False when stopping with nothing
        left to do."""
        with self.ready:
            while not self.waiting and not self.running:
                if self.stopping:
                    return False
                self.loop.call_soon_threadsafe(self._mark_idle)
                self.ready.wait()
            while self.waiting and len(self.running) < self.max_running:
                stream = self.waiting.popleft()
                if not stream.cancelled:
                    self.running.append(stream)
        return True

    def _work(self) -> None:
        run = self.model.runner
        while self._admit():
            self.running = [s for s in self.running if not s.cancelled]
            if not self.running:
                continue
            batch = self.running
            tic = time.perf_counter()
            try:
                deltas = self.predictor.step([s.sequence for s in batch], run)
            except Exception as exc:  # the runtime failed: end these sequences, keep serving the others
                failure = InferenceFailed(f"{type(exc).__name__}: {exc}")
                self.running = []
                self._post([(s, failure) for s in batch])
                continue
            self.seconds_per_step = 0.8 * self.seconds_per_step + 0.2 * (time.perf_counter() - tic)
            self.running = [s for s in batch if not s.sequence.finished]
            self._post(list(zip(batch, deltas)))

    def _post(self, events: list) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver, events)
        except RuntimeError:  # the event loop is closed: nobody is left to answer
            self.stopping = True

    # ------------------------------------------------------------------------------------------ event loop

    def _mark_idle(self) -> None:
        # Checked again here: a request submitted after the worker found nothing to do must not look idle.
        with self.ready:
            if not self.waiting and not self.running:
                self.idle.set()

    def _deliver(self, events: list) -> None:
        now = time.perf_counter()
        generated = 0
        for stream, event in events:
            if isinstance(event, InferenceFailed):
                stream.events.put_nowait((stream.index, event))
                continue
            if stream.first_token_at is None:
                stream.first_token_at = now
                self.ttft.observe(now - stream.queued_at)
            generated += event.token is not None
            stream.events.put_nowait((stream.index, event))
        if generated:
            self.tokens.inc(generated)

    async def drain(self) -> None:
        """Refuse new requests, let every waiting and running sequence finish (or be cancelled), stop the
        worker."""
        self.closing = True
        if self.idle is not None:
            await self.idle.wait()
        with self.ready:
            self.stopping = True
            self.ready.notify_all()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join)
