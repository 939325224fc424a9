"""Dynamic batching: concurrent requests for one model version are grouped, run once, answered one by one.

A batch starts with the oldest waiting request and takes whatever else is queued, then waits at most
`max_wait_ms` for more, up to `max_batch_size`. The graph runs in a thread of its own, so the event loop keeps
accepting and decoding requests meanwhile, and those form the next batch. The queue is bounded: when it is
full a request is refused at once (the route answers 503 with Retry-After) instead of waiting behind a backlog
that would only grow. `max_batch_size=1` is serving without batching: one graph run per request.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

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
    def __init__(self, model, max_batch_size: int, max_wait_ms: float, max_queue: int, metrics: Metrics,
                 labels: tuple[str, str]):
        self.model = model  # export.runtime.InferenceModel
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{labels[0]}-{labels[1]}")
        self.closing = False
        self.worker: asyncio.Task | None = None
        self.seconds_per_batch = 0.01  # running estimate for Retry-After
        self.batch_metric = metrics.batch_size.labels(*labels)
        self.inference_metric = metrics.inference.labels(*labels)
        metrics.queue_depth.labels(*labels).set_function(self.queue.qsize)

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._run())

    def enqueue(self, item) -> asyncio.Future:
        """Queue an item now (no await: the caller knows it is in this version's queue when this returns); the
        future gets its answer, or InferenceFailed. Raises Overloaded when the queue is full, Draining when closing.
        Cancelling the future (a caller's timeout) makes the batch skip the item."""
        if self.closing:
            raise Draining()
        pending = Pending(item, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(pending)
        except asyncio.QueueFull:
            batches_ahead = self.queue.qsize() / self.max_batch_size
            raise Overloaded(max(1, math.ceil(batches_ahead * self.seconds_per_batch))) from None
        return pending.future

    async def _next_batch(self) -> list[Pending]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            # A caller that timed out (or disconnected) has cancelled its future: don't spend the model on it.
            live = [p for p in batch if not p.future.done()]
            try:
                if live:
                    tic = time.perf_counter()
                    try:
                        answers = await loop.run_in_executor(self.executor, self.model.predict,
                                                             [p.item for p in live])
                    except Exception as exc:  # a runtime failure answers this batch with 500s; the server goes on
                        for p in live:
                            if not p.future.done():
                                p.future.set_exception(InferenceFailed(f"{type(exc).__name__}: {exc}"))
                    else:
                        for p, answer in zip(live, answers):
                            if not p.future.done():
                                p.future.set_result(answer)
                    elapsed = time.perf_counter() - tic
                    self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * elapsed
                    self.inference_metric.observe(elapsed)
                    self.batch_metric.observe(len(live))
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def drain(self) -> None:
        """Refuse new requests, answer every accepted one, then stop."""
        self.closing = True
        await self.queue.join()
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)
